"""The only place vlp calls torch.distributed collectives: rank helpers and autograd gathers.

Features are gathered with autograd so that each rank's loss sends gradients back to the rank
that owns the features. ``accelerator.gather`` does not carry gradients and must not be used for
features. The backward of a gather is a SUM over ranks (not a mean): DDP then averages parameter
gradients over ranks, which together gives exactly the full-batch gradient (open_clip#616,
lightly#1977 are the 1/N bugs this avoids).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps mypy quiet across torch versions


def is_distributed() -> bool:
    """True when a default process group exists and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size(group: ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (all ranks when None); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank inside ``group`` (0 without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of every rank's loss."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``group`` along dim 0, keeping autograd.

    Every rank must pass the same shape. On one process it returns ``tensor`` unchanged.
    """
    if world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_reduce_mean(value: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Mean of a (detached) tensor over the ranks of ``group``; for logging and stop flags."""
    value = value.detach().clone()
    if world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value /= world_size(group)
    return value
