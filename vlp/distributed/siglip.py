"""The exact distributed pairwise sigmoid loss (SigLIP, Zhai et al. 2023), tiled.

L = −(1/B) Σ_i Σ_j log σ(z_ij·(s·I_i·T_j + β)), z_ii = +1, z_ij = −1 otherwise. Every term
belongs to one image row, so rank r returns −(1/b)·Σ over its b rows against every text of the
group (as open_clip's ``SigLipLoss``); the mean over ranks is the full-batch loss. Texts travel
around the group in chunks (:mod:`vlp.distributed.tiles`, the ring of the SigLIP paper) and
the backward recomputes each tile. With −log σ(−x) = softplus(x) and softplus(−x) − softplus(x)
= −x, the loss is Σ softplus(S') over all pairs minus Σ S'_ii over the positives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlp.distributed.checks import check_features
from vlp.distributed.collectives import ProcessGroup, RingShift
from vlp.distributed.tiles import DEFAULT_TILE, compute_dtype, ring_backward, ring_forward


class _Sigmoid(torch.autograd.Function):
    """Tiled pairwise sigmoid loss over the group; backward recomputes the tiles."""

    @staticmethod
    def forward(
        ctx: Any,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        group: ProcessGroup | None,
        tile: int,
    ) -> torch.Tensor:
        ring = RingShift(group)
        dtype = compute_dtype(image.dtype)
        rows, s, beta = image.to(dtype), scale.detach().to(dtype), bias.detach().to(dtype)
        total = torch.zeros((), dtype=dtype, device=rows.device)

        def visit(owner: int, rs: slice, cs: slice, raw: torch.Tensor) -> None:
            total.add_(F.softplus(raw.mul_(s).add_(beta)).sum())

        ring_forward(rows, text, ring, tile, visit)
        positives = s * (rows * text.to(dtype)).sum(dim=-1) + beta
        ctx.save_for_backward(image, text, scale, bias)
        ctx.args = (group, tile)
        return (total - positives.sum()) / rows.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        image, text, scale, bias = ctx.saved_tensors
        group, tile = ctx.args
        dtype = compute_dtype(image.dtype)
        rows, own_texts = image.to(dtype), text.to(dtype)
        s, beta = scale.to(dtype), bias.to(dtype)
        b = rows.shape[0]
        g = float(grad) / b
        d_scale = torch.zeros((), dtype=dtype, device=rows.device)
        d_bias = torch.zeros((), dtype=dtype, device=rows.device)

        def tile_grad(owner: int, rs: slice, cs: slice, raw: torch.Tensor) -> torch.Tensor:
            d_logits = torch.sigmoid_(raw * s + beta).mul_(g)
            d_scale.add_(torch.dot(d_logits.view(-1), raw.reshape(-1)))
            d_bias.add_(d_logits.sum())
            return d_logits.mul_(s)

        d_rows, d_texts = ring_backward(rows, text, RingShift(group), tile, tile_grad)
        d_rows.add_(own_texts, alpha=-g * float(s))
        d_texts.add_(rows, alpha=-g * float(s))
        d_scale.add_(-g * (rows * own_texts).sum())
        d_bias.add_(-g * b)
        return (
            d_rows.to(image.dtype),
            d_texts.to(text.dtype),
            d_scale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
            d_bias.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    group: ProcessGroup | None = None,
    tile_size: int | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's rows against all texts of ``group``.

    Args:
        image_features: ``[b, d]`` LOCAL image embeddings (L2-normalised).
        text_features: ``[b, d]`` LOCAL text embeddings; row i pairs with image i.
        logit_scale: s, already exponentiated (SigLIP init 10).
        logit_bias: β (SigLIP init −10).
        group: process group whose batch provides the negatives (None = all ranks).
        tile_size: rows and columns per tile (default 1024).

    Returns:
        −(1/b)·Σ log σ over this rank's b rows × the group's M texts; the mean over ranks is
        the full-batch loss.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
        >>> loss = sigmoid_loss(z, z.flip(0), torch.tensor(10.0), torch.tensor(-10.0))
    """
    if tile_size is not None and tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of rows/columns, got {tile_size}")
    check_features(image_features, text_features, group)
    device = image_features.device
    return _Sigmoid.apply(
        image_features, text_features, torch.as_tensor(logit_scale, device=device),
        torch.as_tensor(logit_bias, device=device), group, tile_size or DEFAULT_TILE,
    )  # fmt: skip
