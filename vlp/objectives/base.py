"""The objective interface (contract v2, docs/architecture.md §2).

An objective owns everything that differs between CLIP, ConVIRT, PyramidCLIP, ProtoCLIP and
PRIOR, so that the trainer, GradCache, checkpoints and the stream need no change to host one:

- **what the batch carries**: :meth:`Objective.fields` names the image views (each with its
  augmentation preset), the text fields (source, tokenizer, per-sample sentence choice) and the
  JSON fields it needs; the stream reads exactly these, and they enter the resume fingerprint;
- **the model call**: :meth:`Objective.model_inputs` turns a batch into the tensors the model
  needs, and :meth:`Objective.encode` runs inside the model's ``forward`` (so DDP/FSDP see one
  forward), returning named outputs;
- **its trainable modules**: :meth:`Objective.heads` returns projection heads, prototype heads,
  decoders..., which become part of the :class:`vlp.models.VlpModel` (optimised, wrapped,
  checkpointed, exported beside the open_clip weights). Objectives hold no parameters;
- **the losses**: ``batch_loss`` couples samples and sees this rank's LOCAL embeddings of all
  accumulated micro-batches; ``sample_loss`` is separable per sample and runs per micro-batch;
- **GradCache declarations**: :attr:`Objective.outputs` says which outputs are batch-coupled
  embeddings (cached, with their dtype), shared scalars, or per-sample tensors used only by
  ``sample_loss`` (never cached);
- **optimizer rules**: :meth:`Objective.no_decay` (parameters AdamW must not decay, beyond the
  default rule), :meth:`Objective.before_optimizer_step` (drop gradients: a frozen phase) and
  :meth:`Objective.after_step` (CLIP clamps its learned scale);
- **episodes** (ProtoCLIP): an :class:`~vlp.objectives.episodic.EpisodicObjective` is driven by
  :mod:`vlp.training.episodes` (a no-grad pass over each episode before training on it).

The trainer sums every returned key that ends in ``_loss`` and logs every key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlp.distributed.collectives import ProcessGroup

if TYPE_CHECKING:
    from vlp.models.vlp_model import VlpModel

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Coupled:
    """A batch-coupled output (an embedding): cached by GradCache over all micro-batches.

    ``dtype``: what the cache holds; None keeps float64 and stores anything else in float32
    (half precision would underflow the ~s/B gradient entries of a large batch).
    """

    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Shared:
    """The same value for every sample (a learned scale or bias): cached once."""


@dataclass(frozen=True)
class PerSample:
    """A per-sample tensor used only by ``sample_loss`` (caption logits): never cached."""


Output = Coupled | Shared | PerSample


@dataclass(frozen=True)
class TextSpec:
    """A text field the batch carries.

    Args:
        source: the sample member (``txt``), ``json:<key>`` (a key of the sample's json),
            ``phrases:<key>`` or ``first_clause:<source>`` (:mod:`data_pipelines.text_sources`).
        tokenizer: ``model`` (the model's own tokenizer) or a Hugging Face tokenizer path/name.
        choose: ``all`` (the whole text) or ``sentence`` (one sentence per sample per step,
            seeded, so identical after a resume).
        min_words: with ``sentence``, drop sentences of fewer words.
        fallback: a source read when the sample lacks ``source`` (the batch then carries
            ``<name>_fallback`` flags); empty: such a sample is skipped and counted.
    """

    source: str = "txt"
    tokenizer: str = "model"
    choose: str = "all"
    min_words: int = 0
    fallback: str = ""


@dataclass(frozen=True)
class JsonSpec:
    """A value of the sample's json the batch carries (padded, with ``<name>_mask``).

    Args:
        source: the json key.
        item: with a list of objects, the key taken from each (``objects`` → ``box``).
    """

    source: str
    item: str = ""


@dataclass(frozen=True)
class Fields:
    """What an objective needs from each sample: named image views (view -> augmentation preset
    name), named text fields, named JSON values passed through (padded, with a mask), and named
    ``.npy`` members (name -> member suffix, e.g. ``regions.npy``: ``[b, n, d]`` with a mask),
    and named sidecars (name -> a safetensors file of one tensor per sample key, stacked)."""

    views: Mapping[str, str] = field(default_factory=lambda: {"image": "openclip"})
    texts: Mapping[str, TextSpec] = field(default_factory=lambda: {"text": TextSpec()})
    json: Mapping[str, JsonSpec] = field(default_factory=dict)
    arrays: Mapping[str, str] = field(default_factory=dict)
    sidecars: Mapping[str, str] = field(default_factory=dict)


@dataclass
class NoSettings:
    """An objective without settings of its own."""


class Objective(nn.Module):
    """Base class of every training objective (see the module docstring for the contract)."""

    Config: ClassVar[type] = NoSettings
    """The dataclass of ``objective.<name>.*`` settings; ``from_config`` builds from it."""

    outputs: ClassVar[Mapping[str, Output]] = {
        "image_features": Coupled(),
        "text_features": Coupled(),
        "logit_scale": Shared(),
    }
    """Every output :meth:`encode` returns, with its kind (GradCache caches by these)."""

    sidecar_commands: ClassVar[Mapping[str, str]] = {}
    """Per sidecar field, the command that writes it (``{shards}``, ``{path}`` filled in, and
    any other ``{key}`` with the value the existing file records in its metadata, so that the
    command remakes the same sidecar): named when training samples are missing from the file,
    or when it was made from another caption source or tokenizer than the run's."""

    tokenized_sidecars: ClassVar[frozenset[str]] = frozenset()
    """The sidecar fields whose rows follow the model tokenizer's tokens (PRIOR's
    log-probabilities): the start-up check compares the ``tokenizer`` their file records with
    the run's (:func:`launch.sidecar_checks.check_data`)."""

    def field_hint(self, field: str) -> str:
        """How to give the shards a batch field ``field`` they lack, named after it at
        start-up (the command that writes it, or a setting that does without); "" when there
        is nothing more specific than writing it into the shards."""
        return ""

    model_kwargs: ClassVar[dict[str, Any]] = {}
    """open_clip model-constructor overrides the objective needs (SigLIP: a logit bias)."""

    evaluations: ClassVar[tuple[str, ...]] = ("zeroshot", "retrieval")
    """The tasks that judge what this objective trains: ``zeroshot`` and ``retrieval`` (the
    image-text towers, run on ``eval.*`` during training), ``captioning`` (a captioning
    decoder). Empty for an objective that trains neither (PRIOR's text-only reference LM):
    its run skips ``eval.*``, which would score untrained, frozen towers."""

    group: ProcessGroup | None = None
    """Process group whose batch gives the negatives; set by the trainer (``train.group_size``)."""

    tile_size: int | None = None
    """Tile of the contrastive core; set by the trainer (``train.tile_size``)."""

    @classmethod
    def from_config(cls, settings: Any) -> Objective:
        """Build from the objective's resolved ``Config`` instance."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)})

    def fields(self) -> Fields:
        """What the stream must put in each batch (default: one ``image`` view, ``text``)."""
        return Fields()

    def use_tokenizer(self, tokenizer: Any) -> None:
        """The model's tokenizer, given before :meth:`build_model` by the launcher: an objective
        whose frozen helper reads token ids checks that it reads the same ones (PRIOR's
        transformers reference LM). Default: unused."""

    def build_model(self, clip: nn.Module) -> VlpModel:
        """The model this objective trains: ``clip`` (which it may partly freeze) plus its heads."""
        from vlp.models.vlp_model import VlpModel

        return VlpModel(clip, self.heads(clip), self.encode, text_pool=self.text_pool())

    def text_pool(self) -> str:
        """How the model's ``encode_text`` pools the text tower's tokens, in training and in
        every evaluation (:mod:`vlp.models.text_pool`): ``eot``, open_clip's own, by default.
        An objective that pools otherwise keeps it in a ``text_pool`` setting: checkpoints and
        exports record the settings, and :func:`evals.loading.with_heads` reads it back."""
        return "eot"

    def heads(self, clip: nn.Module) -> dict[str, nn.Module]:
        """Trainable modules this objective adds to the model (``image``/``text`` heads map the
        towers' embeddings: they are used by ``encode_image``/``encode_text`` too)."""
        return {}

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors the model call needs, taken from a batch (default: image and text)."""
        return {"image": batch["image"], "text": batch["text"]}

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """The model's forward for this objective; runs inside ``VlpModel.forward``."""
        return {
            "image_features": model.encode_image(inputs["image"], normalize=True),
            "text_features": model.encode_text(inputs["text"], normalize=True),
            "logit_scale": learned_scale(model),
        }

    def batch_loss(self, features: Tensors) -> Tensors:
        """Losses that couple samples, from this rank's local embeddings."""
        return {}

    def sample_loss(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """Losses separable per sample, for one micro-batch."""
        return {}

    def log_values(self, outputs: Tensors) -> Tensors:
        """Values to log besides the losses (detached), e.g. the learned scale."""
        return {
            k: v.detach() for k, v in outputs.items() if isinstance(self.outputs.get(k), Shared)
        }

    def no_decay(self, model: VlpModel) -> set[str]:
        """Names (``model.named_parameters()``) AdamW must not decay besides the default rule
        (:mod:`vlp.training.optim`); default: none."""
        return set()

    def before_optimizer_step(self, model: VlpModel) -> None:
        """Runs when the step's gradients are final (all-reduced), before clipping and the step;
        a parameter whose ``grad`` is set to None here is left untouched by the step (AdamW skips
        it: no update, no decay, moments kept). Default: nothing."""

    @torch.no_grad()
    def after_step(self, model: VlpModel) -> None:
        """Rules applied after every optimizer step (default: none)."""

    def forward(self, outputs: Tensors, batch: Mapping[str, Any]) -> Tensors:
        """Both parts on one batch (no accumulation): ``{name: tensor}``."""
        return {**self.batch_loss(outputs), **self.sample_loss(outputs, batch)}


class ConfiguredObjective(Objective):
    """An objective built from its ``Config`` dataclass's fields, validated on construction
    (``objective.<name>: ...`` errors come from ``Config.validate``); read them as
    ``self.settings``."""

    settings: Any

    def __init__(self, **settings: Any):
        super().__init__()
        self.settings = self.Config(**settings)
        validate = getattr(self.settings, "validate", None)
        if validate is not None:
            validate()


def learned_scale(model: VlpModel) -> torch.Tensor:
    """s = exp(t) of open_clip's learned ``logit_scale`` t."""
    scale: torch.Tensor = model.clip.logit_scale
    return scale.exp()


def total_loss(losses: Tensors) -> torch.Tensor:
    """The sum of every ``*_loss`` entry: what the trainer back-propagates. A term of one
    element counts as a scalar: under FSDP, 0-dim parameters have shape [1]
    (``make_scalars_shardable``), and so has a term they enter."""
    terms = [value for key, value in losses.items() if key.endswith("_loss")]
    if not terms:
        raise ValueError(f"objective returned no '*_loss' key (keys: {sorted(losses)})")
    return torch.stack([term.reshape(()) for term in terms]).sum()
