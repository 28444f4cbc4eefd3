"""The exact distributed symmetric InfoNCE loss (CLIP), tiled, with weights and soft targets.

Let S = s·I·Tᵀ be the group's M×M score matrix (M = G·b). Rank r owns the b rows of its images
and the b columns of its texts. Image→text is a softmax over a row, text→image over a column,
so ONE pass over rank r's rows serves both directions: each tile updates the rows' running
log-sum-exp and the columns' partial log-sum-exp, which one all-reduce of M numbers completes.
The texts travel around the group in chunks (:mod:`vlp.distributed.tiles`) and the backward
recomputes every tile, so no b×M matrix and no gathered features are ever held: memory is
O(tile² + b·d + M) per rank, and the work is 4 matrix products per tile where a plain local
loss does 6.

Rank r returns (λ·Σ_rows ℓ_i2t + (1−λ)·Σ_own columns ℓ_t2i)/b. The mean over ranks is exactly the
full-batch loss; each rank's feature gradient is the sum of every rank's loss gradient, which
DDP's averaging turns into exactly the full-batch parameter gradient (no 1/N bug).
"""

from __future__ import annotations

from typing import Any

import torch

from vlp.distributed.checks import check_features
from vlp.distributed.collectives import ProcessGroup, RingShift, all_gather, all_reduce_
from vlp.distributed.tiles import DEFAULT_TILE, compute_dtype, ring_backward, ring_forward


def _logsumexp_all_reduce(partial: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """log Σ_ranks exp(partial), elementwise, identical on every rank of ``group``."""
    peak = all_reduce_(partial.clone(), torch.distributed.ReduceOp.MAX, group)
    total = all_reduce_((partial - peak).exp_(), group=group)
    return total.log_().add_(peak)


class _InfoNCE(torch.autograd.Function):
    """Tiled symmetric InfoNCE over the group: forward one ring pass, backward recomputes."""

    @staticmethod
    def forward(
        ctx: Any,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        weights: tuple[float, float],
        smoothing: float,
        group: ProcessGroup | None,
        tile: int,
    ) -> torch.Tensor:
        ring = RingShift(group)
        dtype = compute_dtype(image.dtype)
        rows, own_texts, s = image.to(dtype), text.to(dtype), scale.detach().to(dtype)
        b, columns = rows.shape[0], rows.shape[0] * ring.size
        row_lse = torch.full((b,), -torch.inf, dtype=dtype, device=rows.device)
        col_lse = torch.full((columns,), -torch.inf, dtype=dtype, device=rows.device)

        def visit(owner: int, rs: slice, cs: slice, raw: torch.Tensor) -> None:
            logits = raw.mul_(s)
            row_lse[rs] = torch.logaddexp(row_lse[rs], logits.logsumexp(dim=1))
            cols = slice(owner * b + cs.start, owner * b + cs.stop)
            col_lse[cols] = torch.logaddexp(col_lse[cols], logits.logsumexp(dim=0))

        ring_forward(rows, text, ring, tile, visit)
        col_lse = _logsumexp_all_reduce(col_lse, group)
        positive = (rows * own_texts).sum(dim=-1)
        off = smoothing / (columns - 1) if smoothing else 0.0
        keep = 1.0 - smoothing - off
        row_loss = row_lse - keep * s * positive
        own = slice(ring.rank * b, (ring.rank + 1) * b)
        col_loss = col_lse[own] - keep * s * positive
        if smoothing:  # −off·Σ_j log p_ij needs the sum of every score in the row / column
            sums = all_reduce_(torch.cat([own_texts.sum(0), rows.sum(0)]), group=group)
            row_loss = row_loss - off * s * (rows * sums[: rows.shape[1]]).sum(dim=-1)
            col_loss = col_loss - off * s * (own_texts * sums[rows.shape[1] :]).sum(dim=-1)
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.args = (weights, off, keep, group, tile)
        return (weights[0] * row_loss.sum() + weights[1] * col_loss.sum()) / b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        weights, off, keep, group, tile = ctx.args
        ring = RingShift(group)
        dtype = row_lse.dtype
        rows, own_texts, s = image.to(dtype), text.to(dtype), scale.to(dtype)
        b = rows.shape[0]
        # Column j's text→image loss belongs to (and is scaled by the grad of) its owner rank.
        g_all = torch.cat(all_gather(grad.detach().to(dtype).reshape(1), group))
        g_rows = float(g_all[ring.rank]) * weights[0] / b
        g_cols = (g_all * weights[1] / b).repeat_interleave(b)
        d_scale = torch.zeros((), dtype=dtype, device=rows.device)

        def tile_grad(owner: int, rs: slice, cs: slice, raw: torch.Tensor) -> torch.Tensor:
            cols = slice(owner * b + cs.start, owner * b + cs.stop)
            logits = raw * s
            d_logits = (logits - row_lse[rs, None]).exp_().sub_(off).mul_(g_rows)
            column_part = logits.sub_(col_lse[None, cols]).exp_().sub_(off)
            d_logits.addcmul_(column_part, g_cols[None, cols])
            d_scale.add_(torch.dot(d_logits.view(-1), raw.reshape(-1)))
            return d_logits.mul_(s)

        d_rows, d_texts = ring_backward(rows, text, ring, tile, tile_grad)
        # The targets' diagonal, analytically: both directions' positive is s·I_i·T_i.
        positive_grad = -keep * float(g_all[ring.rank]) * (weights[0] + weights[1]) / b
        d_rows.add_(own_texts, alpha=positive_grad * float(s))
        d_texts.add_(rows, alpha=positive_grad * float(s))
        d_scale.add_(positive_grad * (rows * own_texts).sum())
        return (
            d_rows.to(image.dtype),
            d_texts.to(text.dtype),
            d_scale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    weights: tuple[float, float] = (0.5, 0.5),
    smoothing: float = 0.0,
    group: ProcessGroup | None = None,
    tile_size: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against all columns of ``group``, exact and tiled.

    Args:
        image_features: ``[b, d]`` LOCAL image embeddings (L2-normalised), row i pairs with
            ``text_features[i]``. Every rank of the group must pass the same b and d.
        text_features: ``[b, d]`` LOCAL text embeddings (or any second embedding set).
        logit_scale: s, already exponentiated (as open_clip's ``ClipLoss`` takes it); a float
            for a fixed temperature (ConVIRT: 1/τ = 10).
        weights: (λ, 1−λ) for image→text and text→image; CLIP ½/½, ConVIRT 0.75/0.25.
        smoothing: α; 1−α on the positive, α/(M−1) on each of the M−1 negatives of the group.
        group: process group whose batch provides the negatives (None = all ranks); see
            :func:`vlp.distributed.groups.contrastive_group`.
        tile_size: rows and columns per tile (default 1024); memory O(tile² + b·d) per rank.

    Returns:
        ``(λ·Σ image→text + (1−λ)·Σ text→image)/b`` over this rank's pairs (float32 for
        half-precision inputs); the mean over the group's ranks is the group's full-batch loss.

    Raises:
        ValueError: shapes that are not ``[b, d]`` or differ between the ranks of the group,
            bad weights, smoothing or tile size. NonFiniteFeaturesError: a NaN/inf feature on
            any rank (raised on every rank, before any large collective).

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> w = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> loss = contrastive_loss(z, w, torch.tensor(10.0))
    """
    if len(weights) != 2 or min(weights) < 0:
        raise ValueError(f"weights must be two non-negative numbers (λ, 1−λ), got {weights}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if tile_size is not None and tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of rows/columns, got {tile_size}")
    columns = check_features(image_features, text_features, group)
    if smoothing > 0 and columns < 2:
        raise ValueError("smoothing needs at least 2 columns (one negative)")
    if not isinstance(logit_scale, torch.Tensor):  # a fixed float: keep all its digits
        logit_scale = torch.tensor(logit_scale, dtype=torch.float64)
    scale = torch.as_tensor(logit_scale, device=image_features.device)
    return _InfoNCE.apply(
        image_features, text_features, scale, (float(weights[0]), float(weights[1])),
        float(smoothing), group, tile_size or DEFAULT_TILE,
    )  # fmt: skip
