"""Grouped aggregation (M2-Encoder): the process groups whose batch provides the negatives.

Ranks are split into consecutive groups of G. Each rank's contrastive loss sees the columns of
its own group only, so features travel over the links inside a group and never across groups.
With G = world size (the default) this is exactly the full-batch loss. With G < world size each
rank sees B·G/N negatives instead of B, and the bytes each rank sends shrink by about (G−1)/(N−1);
the parameter gradients are still averaged over all ranks by DDP. Use it when the links between
groups are slow: with G = GPUs per node, features never leave the node (launchers number the
ranks of one node consecutively).
"""

from __future__ import annotations

import torch.distributed as dist

from vlp.distributed.collectives import ProcessGroup, rank, world_size

_groups: dict[int, ProcessGroup | None] = {}


def check_group_size(group_size: int | None, world: int) -> None:
    """Raise ValueError unless ``group_size`` is None or a positive divisor of ``world``."""
    if group_size is not None and (group_size < 1 or world % group_size):
        raise ValueError(
            f"train.group_size={group_size} must be a positive divisor of the world size {world}"
        )


def contrastive_group(group_size: int | None) -> ProcessGroup | None:
    """The group of ``group_size`` consecutive ranks this rank belongs to (None = all ranks).

    Every rank must call this with the same ``group_size``, in the same order as any other
    group creation: ``torch.distributed.new_group`` is collective. Groups are made once per
    size and reused.

    Raises:
        ValueError: ``group_size`` is not positive or does not divide the world size.
    """
    world = world_size()
    check_group_size(group_size, world)
    if group_size is None or group_size == world:
        return None
    if group_size not in _groups:
        mine = None
        for start in range(0, world, group_size):
            group = dist.new_group(list(range(start, start + group_size)))
            if start <= rank() < start + group_size:
                mine = group
        _groups[group_size] = mine
    return _groups[group_size]
