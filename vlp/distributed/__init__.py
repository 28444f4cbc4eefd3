"""Distributed math: the only package that calls collectives (gathers, groups, the exact losses)."""

from vlp.distributed.checks import NonFiniteFeaturesError
from vlp.distributed.collectives import (
    all_gather,
    all_reduce_mean,
    broadcast_,
    bytes_sent,
    collective_device,
    is_distributed,
    rank,
    reset_bytes_sent,
    world_size,
)
from vlp.distributed.contrastive import contrastive_loss
from vlp.distributed.groups import contrastive_group
from vlp.distributed.siglip import sigmoid_loss

__all__ = [
    "NonFiniteFeaturesError",
    "all_gather",
    "all_reduce_mean",
    "broadcast_",
    "bytes_sent",
    "collective_device",
    "contrastive_group",
    "contrastive_loss",
    "is_distributed",
    "rank",
    "reset_bytes_sent",
    "sigmoid_loss",
    "world_size",
]
