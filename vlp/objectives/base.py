"""The objective interface: batch-coupled and per-sample parts, declared sample fields.

The two parts scale differently (DESIGN.md §2): ``batch_loss`` couples samples (every
contrastive term) and sees this rank's LOCAL embeddings of all accumulated micro-batches;
``sample_loss`` is separable per sample and runs per micro-batch. The trainer sums every
returned key that ends in ``_loss`` and logs every key.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vlp.distributed.collectives import ProcessGroup

Tensors = dict[str, torch.Tensor]


class Objective(nn.Module):
    """Base class of every training objective."""

    requires: ClassVar[frozenset[str]] = frozenset({"txt"})
    """Sample fields the objective needs from the dataset (checked at start-up)."""

    model_kwargs: ClassVar[dict[str, Any]] = {}
    """open_clip model-constructor overrides the objective needs (SigLIP: a logit bias)."""

    group: ProcessGroup | None = None
    """Process group whose batch gives the negatives; set by the trainer (``train.group_size``)."""

    tile_size: int | None = None
    """Tile of the contrastive core; set by the trainer (``train.tile_size``)."""

    def batch_loss(self, features: Tensors) -> Tensors:
        """Losses that couple samples, from this rank's local embeddings."""
        return {}

    def sample_loss(self, outputs: Tensors, batch: Tensors) -> Tensors:
        """Losses separable per sample, for one micro-batch."""
        return {}

    def forward(self, outputs: Tensors, batch: Tensors) -> Tensors:
        """Both parts on one batch (no accumulation): ``{name: tensor}``."""
        return {**self.batch_loss(outputs), **self.sample_loss(outputs, batch)}


def total_loss(losses: Tensors) -> torch.Tensor:
    """The sum of every ``*_loss`` entry: what the trainer back-propagates."""
    terms = [value for key, value in losses.items() if key.endswith("_loss")]
    if not terms:
        raise ValueError(f"objective returned no '*_loss' key (keys: {sorted(losses)})")
    return torch.stack(terms).sum()
