"""ProtoCLIP (Chen et al., "Prototypical Contrastive Language Image Pretraining", arXiv
2206.10996; official code megvii-research/protoclip), trained in episodes.

- **Model** (the method section's projection heads): ``heads["proto_image"]`` and
  ``heads["proto_text"]`` (:class:`~vlp.objectives.protoclip.heads.ProjectionHead`, separate
  parameters; the image head starts as a copy of the text head, ``head_init``) map each tower's embedding BEFORE normalisation to unit 128-d vectors;
  ``heads["proto_scale"]`` is the prototype scale s_p (init 1/0.07, at most 100). The CLIP loss
  keeps the un-projected features and the model's own scale. No weight decay on the heads,
  norms, biases or scales (implementation details; :meth:`ProtoClipObjective.no_decay`).
- **Episodes** (episodic training, :mod:`vlp.training.episodes`): pass 1 encodes the episode's
  M samples in eval mode without gradient (pass 2 then trains on them with freshly drawn
  augmentations, as the official code: ``pass_two_views``); every rank runs k-means (K prototypes, 20
  iterations, 3 restarts) on the gathered image projections, text projections and, with an
  external teacher, the teacher's embeddings, with the same seed, and back-translates them
  (PBT); the main process's labels, centroids and translated centroids are then broadcast, so
  all ranks hold the very same episode state and none waits in a collective while another
  clusters (:meth:`ProtoClipObjective._labels`).
  ``cluster_every`` = n > 1 runs k-means every n-th episode and assigns the others' samples to
  the last centroids (PBT is recomputed).
- **Loss**: w_clip·L_CLIP + w_proto·½(L_I→T + L_T→I) + w_ext·½(L_I→E + L_T→E)
  (:func:`~vlp.objectives.protoclip.prototypes.protoclip_terms`: soft targets at τ_t for the
  towers, hard labels for the teacher, students scored against PBT centroids).
- **Schedule**: the first ``clip_episodes`` episodes (the paper: episode 0) train CLIP alone,
  clustering still running; the last ``lit_episodes`` (2) train CLIP alone with the image tower
  frozen (lr 0: its gradients are dropped before the step, so AdamW leaves it untouched), as the
  official code's LiT phase does; pass 1 is skipped there. As there, the image tower's lr
  cosine reaches 0 when LiT starts (``image_lr_end``), the rest of the model's at the end.
- **External teacher** (the paper's RoBERTa-large, PCA to 64): ``teacher`` names the sidecar
  written by ``vlp protoclip teacher``; the batch carries it as ``teacher``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp.distributed import broadcast_, contrastive_loss
from vlp.models.vlp_model import VlpModel
from vlp.objectives.base import Coupled, Fields, Output, PerSample, Shared, Tensors, learned_scale
from vlp.objectives.clip import clamp_logit_scale
from vlp.objectives.episodic import EPISODE_INDEX, PASS_ONE, EpisodicObjective
from vlp.objectives.protoclip.heads import ProjectionHead, no_decay_parameter_names
from vlp.objectives.protoclip.kmeans import BACKENDS, KMeansResult, kmeans, nearest_centroids
from vlp.objectives.protoclip.prototypes import (
    EpisodePrototypes,
    ExternalPrototypes,
    TermWeights,
    episode_prototypes,
    protoclip_terms,
)
from vlp.objectives.registry import register_objective

logger = logging.getLogger(__name__)

MAX_PROTO_SCALE = math.log(100)
PHASES = ("clip", "proto", "lit")
PHASE_MEANINGS = {
    "clip": "CLIP alone (clustering still runs)",
    "proto": "CLIP and the prototype terms",
    "lit": "CLIP alone with the image tower frozen (LiT)",
}
"""What each phase trains, logged by name when it begins (the metric ``episode/phase`` holds
its index in ``PHASES``)."""
TEACHER = "teacher"
PASS_TWO_VIEWS = ("fresh", "replay")
HEAD_INITS = ("copy", "independent")
IMAGE_LR_ENDS = ("lit", "end")


@dataclass
class ProtoClipSettings:
    """``objective.protoclip.*``: the paper's values by default (README, official code)."""

    episode_size: int = 200_000
    """M: samples per episode, over all processes (a multiple of the global batch)."""
    k: int = 20_000
    """K: prototypes per clustering (image, text and teacher alike)."""
    hidden: int = 2048
    """Width of the heads' hidden layer."""
    dim: int = 128
    """Width of the heads' output (the space that is clustered)."""
    iterations: int = 20
    """Lloyd iterations per k-means run."""
    restarts: int = 3
    """k-means runs per clustering; the one with the lowest within-cluster error is kept."""
    backend: str = "auto"
    """k-means: ``faiss`` (CPU), ``torch`` (deterministic, on the training device), ``auto``."""
    cluster_every: int = 1
    """Run k-means every n-th episode; the others assign to the last centroids."""
    target_temperature: float = 0.01
    """τ_t of the soft targets (<= 0: hard labels)."""
    w_clip: float = 1.0
    """Weight of the instance-level CLIP loss."""
    w_proto: float = 1.0
    """Weight of the prototype terms ½(L_I→T + L_T→I)."""
    w_ext: float = 1.0
    """Weight of the teacher terms ½(L_I→E + L_T→E) (needs ``teacher``)."""
    clip_episodes: int = 1
    """The first episodes train CLIP alone (clustering still runs)."""
    lit_episodes: int = 2
    """The last episodes train CLIP alone with the image tower frozen (LiT)."""
    teacher: str = ""
    """The external teacher's sidecar (``vlp protoclip teacher``); empty: no teacher."""
    augment: str = "protoclip-light"
    """Augmentation preset of the image view (the official 'light' one)."""
    image_lr_end: str = "lit"
    """Where the image tower's lr cosine reaches 0: ``lit``, at the first LiT episode's first
    step (the official code: the visual optimizer's schedule spans the episodes before LiT;
    the rest of the model keeps the cosine to ``train.steps``); ``end``: one cosine to
    ``train.steps`` for all parameters (vlp before issue 23). Resuming a checkpoint written
    with the other choice is refused (the optimizer's groups differ)."""
    head_init: str = "copy"
    """``copy``: the image head starts as a copy of the text head (the official code deep-copies
    it at init; they train apart from there); ``independent``: each head drawn on its own."""
    pass_two_views: str = "fresh"
    """Pass 2's image views: ``fresh`` draws each sample's augmentation anew, so a cluster
    label found on one view is learned from another (the official code, whose second pass
    loads the episode again); ``replay`` trains on pass 1's very views (vlp before issue 23)."""
    seed: int = 0
    """k-means of episode e is seeded with seed + e."""

    def validate(self) -> None:
        """Reject settings that cannot train."""
        if min(self.episode_size, self.k, self.hidden, self.dim, self.iterations) < 1:
            raise ValueError("episode_size, k, hidden, dim and iterations must be >= 1")
        if self.restarts < 1 or self.cluster_every < 1:
            raise ValueError("restarts and cluster_every must be >= 1")
        if self.k > self.episode_size:
            raise ValueError(f"k={self.k} prototypes need an episode of at least k samples")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got '{self.backend}'")
        if min(self.w_clip, self.w_proto, self.w_ext) < 0:
            raise ValueError("w_clip, w_proto and w_ext must be >= 0")
        if min(self.clip_episodes, self.lit_episodes) < 0:
            raise ValueError("clip_episodes and lit_episodes must be >= 0")
        if self.image_lr_end not in IMAGE_LR_ENDS:
            raise ValueError(
                f"image_lr_end must be one of {IMAGE_LR_ENDS}, got '{self.image_lr_end}'"
            )
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got '{self.head_init}'")
        if self.pass_two_views not in PASS_TWO_VIEWS:
            raise ValueError(
                f"pass_two_views must be one of {PASS_TWO_VIEWS}, got '{self.pass_two_views}'"
            )
        if self.teacher and not self.teacher.endswith(".safetensors"):
            raise ValueError(f"teacher must be the .safetensors sidecar, got '{self.teacher}'")


class PrototypeScale(nn.Module):
    """The learned prototype scale s_p = exp(t), t initialised to log(1/0.07)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self) -> torch.Tensor:
        """s_p."""
        return self.log_scale.exp()


@register_objective("protoclip")
class ProtoClipObjective(EpisodicObjective):
    """ProtoCLIP (see the module docstring). Per step it returns ``contrastive_loss`` and, in
    prototype episodes, ``proto_i2t_loss``, ``proto_t2i_loss`` (and ``proto_i2e_loss``,
    ``proto_t2e_loss`` with a teacher); per episode it logs the clustering time and the empty
    clusters of the back translations."""

    Config = ProtoClipSettings
    settings: ProtoClipSettings
    outputs: ClassVar[Mapping[str, Output]] = {
        "image_features": Coupled(),
        "text_features": Coupled(),
        "logit_scale": Shared(),
        "image_projected": PerSample(),
        "text_projected": PerSample(),
        "proto_scale": PerSample(),
    }
    sidecar_commands: ClassVar[Mapping[str, str]] = {
        TEACHER: "vlp protoclip teacher {shards} --out {path} --model {model} --dim {dim} "
        "--pool {pool}"
    }

    def __init__(self, **settings: Any):
        super().__init__(**settings)
        self.phase = "clip"
        self.prototypes: EpisodePrototypes | None = None
        self.centroids: dict[str, torch.Tensor] = {}
        """The last clustering's centroids per modality (reused with ``cluster_every`` > 1)."""

    # ----------------------------------------------------------------------------- model

    def fields(self) -> Fields:
        """One image view (the 'light' preset), the caption, and the teacher's sidecar."""
        sidecars = {TEACHER: self.settings.teacher} if self.settings.teacher else {}
        return Fields(views={"image": self.settings.augment}, sidecars=sidecars)

    def heads(self, clip: nn.Module) -> dict[str, nn.Module]:
        """The two projection heads and the prototype scale (not named image/text: evals use
        the un-projected embeddings, as CLIP's loss does). With ``head_init = copy`` the image
        head starts with the text head's weights, as the official code's deep copy."""
        visual: Any = clip.visual
        embed_dim, s = int(visual.output_dim), self.settings
        text = ProjectionHead(embed_dim, s.hidden, s.dim)
        if s.head_init == "copy":
            image = copy.deepcopy(text)
        else:
            image = ProjectionHead(embed_dim, s.hidden, s.dim)
        return {"proto_image": image, "proto_text": text, "proto_scale": PrototypeScale()}

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """Normalised embeddings and scale for CLIP, projections and s_p for the prototypes;
        pass 1 (``PASS_ONE``) wants the projections alone."""
        image = model.clip.encode_image(inputs["image"], normalize=False)
        text = model.clip.encode_text(inputs["text"], normalize=False)
        projected = {
            "image_projected": model.heads["proto_image"](image),
            "text_projected": model.heads["proto_text"](text),
        }
        if inputs.get(PASS_ONE):
            return projected
        return {
            "image_features": F.normalize(image, dim=-1),
            "text_features": F.normalize(text, dim=-1),
            "logit_scale": learned_scale(model),
            **projected,
            "proto_scale": model.heads["proto_scale"](),
        }

    # ----------------------------------------------------------------------------- losses

    def batch_loss(self, features: Tensors) -> Tensors:
        """w_clip · CLIP's symmetric InfoNCE on the un-projected embeddings (the shared core)."""
        loss = contrastive_loss(
            features["image_features"], features["text_features"], features["logit_scale"],
            group=self.group, tile_size=self.tile_size,
        )  # fmt: skip
        return {"contrastive_loss": self.settings.w_clip * loss}

    def sample_loss(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """The prototype terms in prototype episodes; elsewhere a zero that keeps the heads in
        the graph (DDP waits for every parameter's gradient), whose gradients are then dropped."""
        image, text = outputs["image_projected"], outputs["text_projected"]
        scale = outputs["proto_scale"]
        logged = {"proto_scale": scale.detach()}
        if self.phase != "proto" or self.prototypes is None:
            idle = 0.0 * (image.sum() + text.sum() + scale) + 0.0  # + 0.0: never a logged -0
            return {"proto_idle_loss": idle, **logged}
        s = self.settings
        weights = TermWeights(s.w_proto / 2, s.w_proto / 2, s.w_ext / 2, s.w_ext / 2)
        terms = protoclip_terms(
            image, text, batch[EPISODE_INDEX], self.prototypes, scale,
            target_temperature=s.target_temperature, weights=weights,
        )  # fmt: skip
        return {**terms, **logged}

    # ----------------------------------------------------------------------------- optimizer

    def no_decay(self, model: VlpModel) -> set[str]:
        """The official exclusions: heads, norms, biases and scales."""
        return no_decay_parameter_names(model)

    def before_optimizer_step(self, model: VlpModel) -> None:
        """Outside prototype episodes the heads do not move; in LiT episodes neither does the
        image tower."""
        frozen: list[nn.Parameter] = []
        if self.phase != "proto":
            frozen += model.heads.parameters()
        if self.phase == "lit":
            frozen += model.clip.visual.parameters()
        for param in frozen:
            param.grad = None

    @torch.no_grad()
    def after_step(self, model: VlpModel) -> None:
        """Clamp both learned scales at 100."""
        clamp_logit_scale(model)
        scale: Any = model.heads["proto_scale"]
        scale.log_scale.clamp_(max=MAX_PROTO_SCALE)

    # ----------------------------------------------------------------------------- episodes

    def episode_samples(self) -> int:
        """M."""
        return self.settings.episode_size

    def phase_of(self, episode: int, episodes: int) -> str:
        """``clip``, ``proto`` or ``lit`` (see the module docstring's schedule)."""
        if episodes - episode <= self.settings.lit_episodes:
            return "lit"
        return "clip" if episode < self.settings.clip_episodes else "proto"

    def image_lr_end(self, steps_per_episode: int, episodes: int) -> int | None:
        """The first LiT step, with ``image_lr_end = lit`` and LiT episodes in the run."""
        lit = min(self.settings.lit_episodes, episodes)
        if self.settings.image_lr_end != "lit" or lit == 0:
            return None
        return (episodes - lit) * steps_per_episode

    def fresh_views(self) -> bool:
        """``pass_two_views == "fresh"``."""
        return self.settings.pass_two_views == "fresh"

    def needs_features(self, episode: int, episodes: int) -> bool:
        """Every episode but the LiT ones clusters."""
        return self.phase_of(episode, episodes) != "lit"

    def episode_features(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """The projections (and the teacher's embeddings) of pass 1."""
        features = {"image": outputs["image_projected"], "text": outputs["text_projected"]}
        if self.settings.teacher:
            features[TEACHER] = batch[TEACHER]
        return features

    def begin_episode(self, episode: int, episodes: int, features: Tensors | None) -> Tensors:
        """Cluster (on every rank, the main process's result broadcast) and set the episode's
        phase."""
        previous, self.phase = self.phase, self.phase_of(episode, episodes)
        if episode == 0 or self.phase != previous:
            logger.info(
                "ProtoCLIP episode %d of %d: phase '%s' (episode/phase=%d): %s from here on",
                episode, episodes, self.phase, PHASES.index(self.phase),
                PHASE_MEANINGS[self.phase],
            )  # fmt: skip
        if episode == 0 and "proto" not in {self.phase_of(e, episodes) for e in range(episodes)}:
            logger.warning(
                "objective.protoclip: train.steps hold %d episodes of %d samples, none with the "
                "prototype terms (clip_episodes=%d, lit_episodes=%d): this run trains CLIP only",
                episodes, self.settings.episode_size, self.settings.clip_episodes,
                self.settings.lit_episodes,
            )  # fmt: skip
        logs = {"phase": torch.tensor(float(PHASES.index(self.phase)))}
        if features is None:
            self.prototypes = None
            return logs
        start = time.perf_counter()
        recluster = not self.centroids or episode % self.settings.cluster_every == 0
        labels = self._labels(features, episode, recluster)
        self.prototypes = episode_prototypes(
            features["image"], features["text"],
            KMeansResult(labels["image"], self.centroids["image"], 0.0),
            KMeansResult(labels["text"], self.centroids["text"], 0.0),
            labels.get(TEACHER),
        )  # fmt: skip
        for translated in self._back_translations():
            broadcast_(translated)  # index_add_ need not be deterministic on a GPU
        logs["cluster_s"] = torch.tensor(time.perf_counter() - start)
        logs["empty_clusters"] = torch.tensor(float(self.prototypes.empty))
        logs["reclustered"] = torch.tensor(float(recluster))
        return logs

    def _back_translations(self) -> list[torch.Tensor]:
        assert self.prototypes is not None
        p = self.prototypes
        external = [] if p.external is None else [p.external.image_from_external,
                                                  p.external.text_from_external]  # fmt: skip
        return [p.image_from_text, p.text_from_image, *external]

    def _labels(self, features: Tensors, episode: int, recluster: bool) -> dict[str, torch.Tensor]:
        """Each modality's labels (k-means, or the last centroids) and ``self.centroids``.

        Every rank clusters the same gathered features with the same seed, so no rank waits
        inside a collective while another one clusters: at the paper's M and K a wait for the
        main process alone can outlast the collective timeout (NCCL's default is 10 minutes).
        The main process's result is then broadcast anyway, so every rank holds the very same
        state where a backend is not bitwise reproducible between processes (CUDA atomics,
        faiss's threads); that broadcast waits only for the slowest rank's own k-means."""
        s = self.settings
        labels: dict[str, torch.Tensor] = {}
        for name, x in features.items():
            if recluster:
                result = kmeans(
                    x, s.k, iterations=s.iterations, restarts=s.restarts,
                    seed=s.seed + episode, backend=s.backend,  # type: ignore[arg-type]
                )  # fmt: skip
                centroids = result.centroids.to(device=x.device, dtype=torch.float32)
                self.centroids[name] = broadcast_(centroids.contiguous())
                assigned = result.labels
            else:
                assigned = nearest_centroids(x, self.centroids[name])
            labels[name] = broadcast_(assigned.to(x.device).contiguous())
        return labels

    def episode_state(self) -> Tensors:
        """Labels, centroids and back translations of the current episode, and the centroids
        kept for reuse."""
        state = {f"centroids.{k}": v for k, v in self.centroids.items()}
        state["phase"] = torch.tensor(PHASES.index(self.phase))
        if self.prototypes is not None:
            p = self.prototypes
            state |= {
                f"prototypes.{f.name}": getattr(p, f.name)
                for f in fields(p)
                if f.name not in ("external", "empty")
            }
            state["prototypes.empty"] = torch.tensor(p.empty)
            if p.external is not None:
                state |= {
                    f"external.{f.name}": getattr(p.external, f.name) for f in fields(p.external)
                }
        return state

    def load_episode_state(self, episode: int, episodes: int, state: Tensors) -> None:
        """Continue from :meth:`episode_state` (no re-clustering)."""
        self.centroids = {
            k.removeprefix("centroids."): v for k, v in state.items() if k.startswith("centroids.")
        }
        self.phase = PHASES[int(state["phase"])]
        if "prototypes.image_labels" not in state:
            self.prototypes = None
            return
        external = None
        if "external.labels" in state:
            external = ExternalPrototypes(
                **{f.name: state[f"external.{f.name}"] for f in fields(ExternalPrototypes)}
            )
        self.prototypes = EpisodePrototypes(
            **{
                f.name: state[f"prototypes.{f.name}"]
                for f in fields(EpisodePrototypes)
                if f.name not in ("external", "empty")
            },
            external=external,
            empty=int(state["prototypes.empty"]),
        )
