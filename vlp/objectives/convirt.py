"""ConVIRT (Zhang et al., "Contrastive Learning of Medical Visual Representations from Paired
Images and Text", MLHC 2022, arXiv 2010.00747), through vlp's exact distributed core.

Followed from the paper (see docs/architecture.md, "How to add an objective"):

- §3.2, Eqs 2–4: L = (1/N) Σ_i [λ ℓ_i^{v→u} + (1−λ) ℓ_i^{u→v}], cosine similarity over a fixed
  temperature τ; Appendix A: λ = 0.75, τ = 0.1, projection output 512. Here this is the shared
  tiled core with weights (λ, 1−λ) and scale 1/τ, so it is grouped and accumulation-exact.
- §3.3 heads g_v, g_u = W2·ReLU(W1·x): W1 is the open_clip tower's own linear projection (in
  the ConVIRT model configs: timm's ``linear`` projection of ResNet-50's average-pooled
  features, ``hf_proj_type: linear`` on the max-pooled text tower), so the hidden width is the
  model's ``embed_dim`` (512), a choice the paper leaves open; the head adds ReLU and W2
  (``head=linear``: W2 alone, the paper's linear ablation).
- §3.3 text: a BERT-style tower max-pooled over tokens (the model config), its embeddings and
  first ``frozen_text_layers`` layers frozen (paper: 6 of 12); one sentence of the report sampled
  per sample per step (seeded by the stream), sentences under 3 words dropped.
- Appendix A augmentations: the ``convirt`` preset (``data_pipelines.augment``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from vlp.distributed import contrastive_loss
from vlp.models.freeze import freeze_text_layers
from vlp.models.vlp_model import VlpModel
from vlp.objectives.base import (
    ConfiguredObjective,
    Coupled,
    Fields,
    Output,
    Shared,
    Tensors,
    TextSpec,
    learned_scale,
)
from vlp.objectives.clip import clamp_logit_scale
from vlp.objectives.registry import register_objective

HEADS = ("mlp", "linear")


@dataclass
class ConvirtSettings:
    """``objective.convirt.*``: the paper's values by default."""

    lam: float = 0.75
    """λ: weight of the image→text direction; 1−λ goes to text→image."""
    temperature: float = 0.1
    """τ, fixed (the paper's); ignored with ``learn_temperature``."""
    learn_temperature: bool = False
    """Use the model's learned scale (CLIP's) instead of a fixed τ."""
    head: str = "mlp"
    """``mlp``: ReLU then a linear map to ``head_dim`` on each tower's embedding; ``linear``."""
    head_dim: int = 512
    """Output width of both heads (the paper: 512)."""
    text_source: str = "json:report"
    """Where the report is: a member (``txt``) or ``json:<key>``."""
    min_words: int = 3
    """Sentences with fewer words are dropped (the paper: 3 tokens)."""
    augment: str = "convirt"
    """Augmentation preset of the image view (``data_pipelines.augment``)."""
    frozen_text_layers: int = 6
    """Freeze the HF text tower's embeddings and this many bottom layers (-1: freeze nothing)."""

    def validate(self) -> None:
        """Reject settings that cannot train."""
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got '{self.head}'")
        if self.head_dim < 1 or self.min_words < 0 or self.frozen_text_layers < -1:
            raise ValueError("head_dim >= 1, min_words >= 0, frozen_text_layers >= -1")


def projection_head(kind: str, embed_dim: int, out_dim: int) -> nn.Module:
    """ConVIRT's g = W2·ReLU(·) on a tower's projected embedding (``mlp``), or W2 (``linear``)."""
    linear = nn.Linear(embed_dim, out_dim)
    return nn.Sequential(nn.ReLU(), linear) if kind == "mlp" else linear


@register_objective("convirt")
class ConvirtObjective(ConfiguredObjective):
    """Weighted bidirectional InfoNCE over heads on both towers (see the module docstring).

    Example:
        >>> objective = ConvirtObjective(lam=0.75, temperature=0.1)
        >>> losses = objective.batch_loss(model(objective.model_inputs(batch)))  # doctest: +SKIP
    """

    Config = ConvirtSettings
    settings: ConvirtSettings
    outputs: ClassVar[Mapping[str, Output]] = {
        "image_features": Coupled(),
        "text_features": Coupled(),
        "logit_scale": Shared(),
    }

    def fields(self) -> Fields:
        """One image view with the ``convirt`` preset; one report sentence per sample per step."""
        text = TextSpec(
            self.settings.text_source, choose="sentence", min_words=self.settings.min_words
        )
        return Fields(views={"image": self.settings.augment}, texts={"text": text})

    def field_hint(self, field: str) -> str:
        """Shards without reports: the captions can stand in for them."""
        if field == "text" and self.settings.text_source != "txt":
            return "objective.convirt.text_source=txt trains on the captions (txt) instead"
        return ""

    def build_model(self, clip: nn.Module) -> VlpModel:
        """Freeze the text tower's bottom (an HF tower), and the model's learned scale when τ
        is fixed (unused: DDP would wait for its gradient); then add the heads."""
        if self.settings.frozen_text_layers >= 0:
            freeze_text_layers(clip, self.settings.frozen_text_layers)
        if not self.settings.learn_temperature:
            clip.logit_scale.requires_grad_(False)
        return super().build_model(clip)

    def heads(self, clip: nn.Module) -> dict[str, nn.Module]:
        """``image`` and ``text`` heads (used by ``encode_image``/``encode_text`` in evals too)."""
        visual: Any = clip.visual  # an open_clip image tower: output_dim is the embed_dim
        embed_dim = int(visual.output_dim)
        s = self.settings
        return {side: projection_head(s.head, embed_dim, s.head_dim) for side in ("image", "text")}

    def encode(self, model: VlpModel, inputs: Mapping[str, Any]) -> Tensors:
        """Headed, L2-normalised embeddings (and the learned scale when it is learned)."""
        outputs = {
            "image_features": model.encode_image(inputs["image"], normalize=True),
            "text_features": model.encode_text(inputs["text"], normalize=True),
        }
        if self.settings.learn_temperature:
            outputs["logit_scale"] = learned_scale(model)
        return outputs

    def after_step(self, model: VlpModel) -> None:
        """A learned temperature is clamped as CLIP's; a fixed one needs nothing."""
        if self.settings.learn_temperature:
            clamp_logit_scale(model)

    def batch_loss(self, features: Tensors) -> Tensors:
        """λ·image→text + (1−λ)·text→image at scale 1/τ (or the learned one)."""
        s = self.settings
        scale = features["logit_scale"] if s.learn_temperature else 1.0 / s.temperature
        loss = contrastive_loss(
            features["image_features"],
            features["text_features"],
            scale,
            weights=(s.lam, 1.0 - s.lam),
            group=self.group,
            tile_size=self.tile_size,
        )
        return {"contrastive_loss": loss}
