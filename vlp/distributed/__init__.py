"""Distributed math: the only package that calls collectives (gathers, groups, the exact loss)."""

from vlp.distributed.collectives import (
    all_gather_with_grad,
    all_reduce_mean,
    is_distributed,
    rank,
    world_size,
)
from vlp.distributed.contrastive import contrastive_loss, soft_cross_entropy

__all__ = [
    "all_gather_with_grad",
    "all_reduce_mean",
    "contrastive_loss",
    "is_distributed",
    "rank",
    "soft_cross_entropy",
    "world_size",
]
