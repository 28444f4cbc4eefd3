"""PyramidCLIP (Gao et al., "PyramidCLIP: Hierarchical Feature Alignment for Vision-language
Model Pretraining", NeurIPS 2022, arXiv 2204.14095), through vlp's exact distributed core.

Followed from the paper's Figure 2, the official model code (Yuting-Gao/PyramidCLIP
``models/models.py``: the model, not the loss or the training) and, where marked, from
secondary reading notes (shared/REFERENCES.md); §3 of the paper was not reachable:

- **Input pyramid** (§3.1, Fig. 2). The image tower splits as f = f2∘f1, f2 its last
  ``last_blocks`` blocks (:mod:`vlp.models.vit_split`; 3 for ViTs per the notes). The global view
  (RandomResizedCrop 0.9–1, the ``openclip`` preset) and the local view (0.5–1,
  ``pyramid-local``) go through f1 then f2. ROI branch, as the official ``VisionTransformer``
  (``isROI``): region features go through a bias-free linear embedding φ, the tower's OWN
  ``class_embedding`` is prepended (no new token, no position embedding), the tower's
  ``ln_pre`` is applied, and the sequence enters f2 directly, skipping f1 (f2 ends with the
  tower's ``ln_post`` and projection); up to ``max_regions`` regions, padded ones masked out of
  attention (the official mask opens 11 slots whatever the count).
- **Towers** (official code): its ViT replaces the MLP of the first 9 of 12 blocks with a
  convolutional feed-forward (LeFF, with BatchNorm) and freezes the patch embedding. vlp's towers
  are open_clip's, unchanged (plain MLPs, the patch embedding trains): BatchNorm would break the
  exact GradCache and the per-rank exactness, and the model would no longer load in open_clip.
- **Region features.** ``regions=json``: each object's ``feature`` (detector features written
  by ``vlp shards attach``); ``regions=npy``: a ``[n, d]`` ``.npy`` member of the sample.
  ``regions=pooled`` (the default, no detector needed): f1's
  patch-token grid of the ``whole`` view (the image resized without cropping, so a box's
  normalised coordinates hold) pooled inside each box with ``torchvision.ops.roi_align``,
  without gradient through the pooling. These are not the paper's features: f1 is the tower's
  own first blocks, which train, so the regions move with the model; the paper feeds a frozen
  detector's 2048-d region features (with their boxes). For paper runs use ``regions=json``
  or ``npy`` with detector features (``vlp shards attach``).
- **Text features** (official ``encode_text``): ``text_pool=max`` (the default) takes the
  maximum over all token positions of the text tower's ``ln_final`` output, then projects
  (:mod:`vlp.models.text_pool`), for every text here and in every evaluation of the model
  (checkpoints and exports record it; open_clip loading an export alone pools the end-of-text
  token); ``eot`` is open_clip's end-of-text token.
- **Text pyramid** (Fig. 2): the summary T_s (``json:summary``; absent, the caption's first
  clause, flagged per sample and logged as ``summary_fallback``), the caption T and the
  object-attribute text T_OA, the objects' "attribute ... category" phrases joined with commas.
- **Loss** (notes): six symmetric InfoNCE terms with softened targets (1−α on the positive,
  α/(N−1) on each negative, α = 0.2, the core's ``smoothing``). Peer level L_GS (global ↔
  summary), L_LT (local ↔ caption); cross level L_GA (global ↔ T_OA), L_RS (ROI ↔ summary),
  L_LA (local ↔ T_OA), L_RT (ROI ↔ caption); L = (1−λ−μ)(L_GS + L_LT)/2 + λ(L_GA + L_RS)/2 +
  μ(L_LA + L_RT)/2, λ = μ = 1/3. The temperature is the model's learned one (init 0.07),
  clamped as CLIP's.

A sample without regions gets the class token alone on the ROI branch (finite, never NaN).
Terms with weight 0 are not computed, and what only they need (views, texts, the ROI branch) is
neither read nor built; ``clip_only`` is the ablation to CLIP on (global, caption).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from vlp.distributed import contrastive_loss
from vlp.models import vit_split
from vlp.models.text_pool import TEXT_POOLS
from vlp.models.vlp_model import VlpModel
from vlp.objectives.base import (
    ConfiguredObjective,
    Coupled,
    Fields,
    JsonSpec,
    Output,
    Shared,
    Tensors,
    TextSpec,
    learned_scale,
)
from vlp.objectives.clip import clamp_logit_scale
from vlp.objectives.registry import register_objective

TERMS: dict[str, tuple[str, str]] = {
    "gs": ("global", "summary"),
    "lt": ("local", "caption"),
    "ga": ("global", "attributes"),
    "rs": ("roi", "summary"),
    "la": ("local", "attributes"),
    "rt": ("roi", "caption"),
}
"""Each term: (image side, text side)."""
REGIONS = ("pooled", "json", "npy")


@dataclass
class PyramidClipSettings:
    """``objective.pyramidclip.*``: the paper's values by default."""

    lam: float = 1 / 3
    """λ: weight of the global cross level (L_GA + L_RS)/2."""
    mu: float = 1 / 3
    """μ: weight of the local cross level (L_LA + L_RT)/2; the peer level gets 1−λ−μ."""
    smoothing: float = 0.2
    """α of the softened targets (0: plain InfoNCE)."""
    w_gs: float = 1.0
    """Extra weight of L_GS, global view ↔ summary (0 switches the term off)."""
    w_lt: float = 1.0
    """Extra weight of L_LT, local view ↔ original text (0 switches the term off)."""
    w_ga: float = 1.0
    """Extra weight of L_GA, global view ↔ attribute text (0 switches the term off)."""
    w_rs: float = 1.0
    """Extra weight of L_RS, ROI ↔ summary (0 switches the term off)."""
    w_la: float = 1.0
    """Extra weight of L_LA, local view ↔ attribute text (0 switches the term off)."""
    w_rt: float = 1.0
    """Extra weight of L_RT, ROI ↔ original text (0 switches the term off)."""
    clip_only: bool = False
    """Ablation: symmetric InfoNCE on (global view, caption) alone, with the same smoothing."""
    last_blocks: int = 3
    """k: f2 is the image tower's last k blocks."""
    max_regions: int = 10
    """Regions per sample on the ROI branch (the first ones; more are dropped)."""
    regions: str = "pooled"
    """``pooled`` (from f1's token grid inside each box: the training tower's own features, no
    detector), ``json`` (each object's ``feature``) or ``npy`` (the sample's ``region_member``,
    ``[n, region_dim]``); the paper uses a frozen detector's features: json or npy."""
    region_dim: int = 0
    """Width of the stored region features (``regions=json`` or ``npy``)."""
    region_member: str = "regions.npy"
    """The ``.npy`` member with ``regions=npy``."""
    objects_key: str = "objects"
    """The json list of ``{"box", "tag", "attributes"[, "feature"]}`` objects."""
    summary_source: str = "json:summary"
    """Where the summary is."""
    summary_fallback: str = "first_clause:txt"
    """Read when a sample has no summary ("": such samples are skipped and counted)."""
    local_augment: str = "pyramid-local"
    """Augmentation preset of the local view."""
    text_pool: str = "max"
    """Text features: ``max`` over all token positions after ``ln_final``, then projected (the
    official ``encode_text``), or ``eot`` (open_clip's end-of-text token); used in training and
    in every evaluation of the model."""

    def validate(self) -> None:
        """Reject settings that cannot train."""
        if min(self.lam, self.mu) < 0 or self.lam + self.mu > 1:
            raise ValueError(f"need lam, mu >= 0 and lam + mu <= 1, got {self.lam}, {self.mu}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if min(self.term_weights().values()) < 0:
            raise ValueError("term weights w_* must be >= 0")
        if not self.clip_only and not any(self.active_terms()):
            raise ValueError("every term has weight 0; set a w_* or clip_only=true")
        if self.regions not in REGIONS:
            raise ValueError(f"regions must be one of {REGIONS}, got '{self.regions}'")
        if self.regions != "pooled" and self.region_dim < 1:
            raise ValueError(f"regions={self.regions} needs region_dim, the features' width")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got '{self.text_pool}'")
        if self.last_blocks < 1 or self.max_regions < 1:
            raise ValueError("last_blocks and max_regions must be >= 1")

    def term_weights(self) -> dict[str, float]:
        """Each term's weight in L: its level's weight / 2 times its own ``w_*``."""
        level = {"gs": 1 - self.lam - self.mu, "lt": 1 - self.lam - self.mu}
        level |= {"ga": self.lam, "rs": self.lam, "la": self.mu, "rt": self.mu}
        return {term: level[term] / 2 * getattr(self, f"w_{term}") for term in TERMS}

    def active_terms(self) -> dict[str, float]:
        """Terms with a non-zero weight (none with ``clip_only``)."""
        return {} if self.clip_only else {t: w for t, w in self.term_weights().items() if w > 0}

    def sides(self) -> set[str]:
        """The image views / texts / ROI branch that the active terms use."""
        if self.clip_only:
            return {"global", "caption"}
        return {side for term in self.active_terms() for side in TERMS[term]}


LEGACY_ROI_KEYS = ("cls", "embed.bias")
"""Parameters of the ROI branch before it followed the official code (a learned CLS token and a
biased φ, no ``ln_pre``)."""


class RoiBranch(nn.Module):
    """φ, the official ``proj_pre``: a bias-free linear map of region features to the tower's
    width (initialised N(0, width^-1) as there). The tokens entering f2 are the tower's own
    ``class_embedding`` and the embedded regions, through the tower's ``ln_pre``."""

    def __init__(self, region_dim: int, width: int):
        super().__init__()
        self.embed = nn.Linear(region_dim, width, bias=False)
        nn.init.normal_(self.embed.weight, std=width**-0.5)

    def forward(
        self, visual: Any, regions: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, n, region_dim]`` regions, ``[b, n]`` valid -> tokens ``[b, 1 + n, width]`` and
        their mask (the class token always valid), for the tower ``visual``."""
        tokens = self.embed(regions)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        first = torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)
        tokens = visual.ln_pre(torch.cat([cls, tokens], dim=1))
        return tokens, torch.cat([first, valid.bool()], dim=1)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """Refuse, in one line, a state written before the branch followed the official code:
        its CLS token and bias have no counterpart here (no conversion keeps its function)."""
        legacy = [prefix + key for key in LEGACY_ROI_KEYS if prefix + key in state_dict]
        if legacy:
            raise ValueError(
                f"{', '.join(legacy)}: a PyramidCLIP ROI branch saved by an older vlp (a learned "
                "CLS token and a biased φ; now the tower's class_embedding, a bias-free φ and "
                "ln_pre) cannot be loaded; train anew (its open_clip weights, model.safetensors, "
                "still load in open_clip, with end-of-text text pooling as they were trained)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)


def pooled_regions(grid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Region features ``[b, n, w]``: the mean of a 2x2 ``roi_align`` of the token grid
    ``[b, w, g, g]`` inside each box (``[b, n, 4]``, x0 y0 x1 y1 in [0, 1])."""
    b, n = boxes.shape[:2]
    index = torch.arange(b, device=boxes.device, dtype=grid.dtype).repeat_interleave(n)
    rois = torch.cat([index[:, None], boxes.reshape(b * n, 4).to(grid.dtype)], dim=1)
    pooled = roi_align(grid, rois, output_size=2, spatial_scale=grid.shape[-1], aligned=True)
    return pooled.mean(dim=(2, 3)).reshape(b, n, grid.shape[1])


@register_objective("pyramidclip")
class PyramidClipObjective(ConfiguredObjective):
    """Six softened InfoNCE terms over a pyramid of views and texts (see the module docstring).

    Example:
        >>> objective = PyramidClipObjective()
        >>> losses = objective.batch_loss(model(objective.model_inputs(batch)))  # doctest: +SKIP
    """

    Config = PyramidClipSettings
    settings: PyramidClipSettings
    outputs: ClassVar[Mapping[str, Output]] = {
        **{f"{side}_features": Coupled() for side in ("global", "local", "roi")},
        **{f"{side}_features": Coupled() for side in ("summary", "caption", "attributes")},
        "logit_scale": Shared(),
    }

    def field_hint(self, field: str) -> str:
        """Summaries and objects go into existing shards' json with ``vlp shards attach``."""
        if field in ("summary", "attributes", "boxes", "regions"):
            return (
                "vlp shards attach SHARDS --jsonl RECORDS.jsonl --out OUT writes summaries and "
                "objects into copies of the shards (README: 'Attaching summaries and detected "
                "objects')"
            )
        return ""

    def fields(self) -> Fields:
        """The views, texts and json values the active terms need."""
        s, sides = self.settings, self.settings.sides()
        views = {"global": "openclip", "local": s.local_augment}
        texts = {
            "summary": TextSpec(s.summary_source, fallback=s.summary_fallback),
            "caption": TextSpec("txt"),
            "attributes": TextSpec(f"phrases:{s.objects_key}"),
        }
        json, arrays = {}, {}
        if "roi" in sides and s.regions == "pooled":
            views["roi"] = "whole"
            json["boxes"] = JsonSpec(s.objects_key, "box")
        elif "roi" in sides and s.regions == "json":
            json["regions"] = JsonSpec(s.objects_key, "feature")
        elif "roi" in sides:
            arrays["regions"] = s.region_member
        return Fields(
            views={k: v for k, v in views.items() if k in sides},
            texts={k: v for k, v in texts.items() if k in sides},
            json=json,
            arrays=arrays,
        )

    def build_model(self, clip: nn.Module) -> VlpModel:
        """Check that the image tower splits at ``last_blocks``, then add the ROI branch (and the
        model pools text as ``text_pool`` says)."""
        vit_split.check_splittable(getattr(clip, "visual", None), self.settings.last_blocks)
        return super().build_model(clip)

    def text_pool(self) -> str:
        """The ``text_pool`` setting (``max``: the official ``encode_text``)."""
        return str(self.settings.text_pool)

    def heads(self, clip: nn.Module) -> dict[str, nn.Module]:
        """The ROI branch (φ), when an ROI term is active."""
        if "roi" not in self.settings.sides():
            return {}
        visual: Any = clip.visual
        width = int(visual.transformer.width)
        region_dim = width if self.settings.regions == "pooled" else self.settings.region_dim
        return {"roi": RoiBranch(region_dim, width)}

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The declared views, texts and boxes (regions) of the batch."""
        declared = self.fields()
        keys = [*declared.views, *declared.texts]
        keys += [k for name in [*declared.json, *declared.arrays] for k in (name, f"{name}_mask")]
        return {key: batch[key] for key in keys if key in batch}

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """L2-normalised embeddings of every side the active terms use, and the scale."""
        s = self.settings
        visual = model.clip.visual
        views = [v for v in ("global", "local") if v in inputs]
        tokens = vit_split.f1(visual, torch.cat([inputs[v] for v in views]), s.last_blocks)
        images = vit_split.f2(visual, tokens, s.last_blocks).split(len(inputs[views[0]]))
        outputs = {
            f"{v}_features": F.normalize(x, dim=-1) for v, x in zip(views, images, strict=True)
        }
        if "boxes" in inputs or "regions" in inputs:
            outputs["roi_features"] = F.normalize(self._roi(model, inputs), dim=-1)
        texts = [t for t in ("summary", "caption", "attributes") if t in inputs]
        encoded = model.encode_text(torch.cat([inputs[t] for t in texts]), normalize=True)
        encoded_texts = encoded.split(len(inputs[texts[0]]))
        outputs |= {f"{t}_features": x for t, x in zip(texts, encoded_texts, strict=True)}
        return {**outputs, "logit_scale": learned_scale(model)}

    def _roi(self, model: VlpModel, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The ROI branch: regions -> φ -> ln_pre([class_embedding, regions]) -> f2 (skipping
        f1)."""
        s, visual = self.settings, model.clip.visual
        name = "boxes" if s.regions == "pooled" else "regions"
        width = 4 if s.regions == "pooled" else s.region_dim
        stored, valid = inputs[name], inputs[f"{name}_mask"][:, : s.max_regions]
        if stored.ndim != 3:  # a batch without any region collates as [b, 0]
            stored = stored.reshape(stored.shape[0], 0, width)
        stored = stored[:, : s.max_regions]
        if s.regions == "pooled":
            with torch.no_grad():  # no gradient through the pooling (f1 itself trains)
                grid = vit_split.token_grid(vit_split.f1(visual, inputs["roi"], s.last_blocks))
            regions = pooled_regions(grid, stored)
        else:
            regions = stored
        branch: Any = model.heads["roi"]
        tokens, mask = branch(visual, regions.to(branch.embed.weight.dtype), valid)
        return vit_split.f2(visual, tokens, s.last_blocks, mask)

    def after_step(self, model: VlpModel) -> None:
        """Clamp the learned scale (s <= 100), as CLIP does."""
        clamp_logit_scale(model)

    def batch_loss(self, features: Tensors) -> Tensors:
        """Each active term weighted (``<term>_loss``), and unweighted for the log (``L_<term>``)."""
        s, scale = self.settings, features["logit_scale"]
        pairs = {"clip": ("global", "caption")} if s.clip_only else {t: TERMS[t] for t in TERMS}
        weights = {"clip": 1.0} if s.clip_only else s.active_terms()
        losses: Tensors = {}
        for term, weight in weights.items():
            image, text = pairs[term]
            value = contrastive_loss(
                features[f"{image}_features"],
                features[f"{text}_features"],
                scale,
                smoothing=s.smoothing,
                group=self.group,
                tile_size=self.tile_size,
            )
            losses[f"{term}_loss"] = weight * value
            losses[f"L_{term}"] = value.detach()
        return losses

    def sample_loss(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """No per-sample loss; the share of summaries that came from the fallback, logged."""
        flags = batch.get("summary_fallback")
        return {} if flags is None else {"summary_fallback": flags.float().mean()}
