"""CLIP's symmetric InfoNCE (Radford et al. 2021), through vlp's exact distributed core."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vlp.distributed import contrastive_loss
from vlp.models.vlp_model import VlpModel
from vlp.objectives.base import Objective, Tensors
from vlp.objectives.registry import register_objective

MAX_LOGIT_SCALE = math.log(100)
"""CLIP clamps its learned temperature so that s = exp(t) <= 100."""


@dataclass
class ClipSettings:
    """``objective.clip.*``."""

    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    """(λ, 1−λ): weights of the image→text and text→image directions."""
    smoothing: float = 0.0
    """α of softened targets: 1−α on the positive, α/(N−1) on each negative (0 = CLIP's)."""


def clamp_logit_scale(model: VlpModel) -> None:
    """CLIP's post-step rule: the learned t = log s stays in [0, log 100]."""
    with torch.no_grad():
        model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


@register_objective("clip")
class ClipObjective(Objective):
    """Symmetric InfoNCE over the (group's) global batch with the model's learned scale.

    Features: ``image_features`` and ``text_features`` ``[b, d]`` (L2-normalised, this rank's
    rows) and ``logit_scale`` (s = exp t). Returns ``{"contrastive_loss": scalar}``.

    Args:
        weights: (λ, 1−λ) weights of the image→text and text→image directions.
        smoothing: α of softened targets (0 = CLIP's hard targets).

    Example:
        >>> objective = ClipObjective()
        >>> losses = objective.batch_loss(model(images, texts))  # doctest: +SKIP
    """

    Config = ClipSettings

    def __init__(
        self, weights: tuple[float, float] | list[float] = (0.5, 0.5), smoothing: float = 0.0
    ):
        super().__init__()
        if len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be two non-negative numbers, got {weights}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.weights = (float(weights[0]), float(weights[1]))
        self.smoothing = float(smoothing)

    def after_step(self, model: VlpModel) -> None:
        """Clamp the learned scale (s <= 100), as CLIP does."""
        clamp_logit_scale(model)

    def batch_loss(self, features: Tensors) -> Tensors:
        """The contrastive term on this rank's local embeddings (gathering happens inside)."""
        loss = contrastive_loss(
            features["image_features"],
            features["text_features"],
            features["logit_scale"],
            weights=self.weights,
            smoothing=self.smoothing,
            group=self.group,
            tile_size=self.tile_size,
        )
        return {"contrastive_loss": loss}
