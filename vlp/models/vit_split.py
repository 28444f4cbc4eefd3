"""An open_clip ViT image tower split as f = f2∘f1, with f2 its last k blocks (PyramidCLIP).

PyramidCLIP (Gao et al. 2022, §3.1 and Fig. 2) sends the global and the local view through
f1 then f2, and region (ROI) features through a linear embedding straight into f2, skipping
f1. These functions run the tower's own modules in that split, so the split model is still the
open_clip model (``f2(f1(x))`` equals ``visual(x)`` exactly) and loads in open_clip unchanged.

Only open_clip's ``VisionTransformer`` with class-token pooling and no attentional pooler is
split: f2 must take a token sequence whose first token it pools. ResNets (ModifiedResNet, timm
towers) are refused with a message, as are towers with patch dropout (f1's token grid would
have holes where regions are pooled).
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


class SplitError(ValueError):
    """The image tower cannot be split as PyramidCLIP needs."""


def check_splittable(visual: Any, last_blocks: int) -> None:
    """Refuse a tower that :func:`f1`/:func:`f2` cannot split at ``last_blocks``.

    Raises:
        SplitError: naming what is missing (a ViT, class-token pooling, enough blocks...).
    """
    if not isinstance(visual, VisionTransformer):
        raise SplitError(
            f"PyramidCLIP splits a ViT image tower into f1 and its last blocks f2; this model's "
            f"image tower is {type(visual).__name__} (ResNets are not supported: pick a ViT "
            "model such as ViT-B-32 or vlp-tiny-vit)"
        )
    blocks = len(visual.transformer.resblocks)
    if not 1 <= last_blocks <= blocks:
        raise SplitError(f"last_blocks must be in [1, {blocks}] for this tower, got {last_blocks}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise SplitError(
            f"PyramidCLIP's ROI branch needs class-token pooling; this tower pools with "
            f"pool_type='{visual.pool_type}' and attentional pooler "
            f"{visual.attn_pool is not None}"
        )
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise SplitError(
            "PyramidCLIP pools regions from f1's whole token grid, which patch dropout leaves "
            "with holes: set model.patch_dropout=0 (and vision_cfg.patch_dropout=0)"
        )
    if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
        raise SplitError("PyramidCLIP needs open_clip's ResidualAttentionBlock in the tower")


def _blocks(visual: Any, x: torch.Tensor, blocks: Any, mask: torch.Tensor | None) -> torch.Tensor:
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=mask)
    return x if transformer.batch_first else x.transpose(0, 1)


def f1(visual: Any, images: torch.Tensor, last_blocks: int) -> torch.Tensor:
    """Tokens ``[b, 1 + g*g, width]`` after the patch embedding and all but the last blocks."""
    resblocks = visual.transformer.resblocks
    return _blocks(visual, visual._embeds(images), resblocks[: len(resblocks) - last_blocks], None)


def f2(
    visual: Any, tokens: torch.Tensor, last_blocks: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The tower's embedding ``[b, embed_dim]`` (unnormalised) from tokens entering its last
    ``last_blocks`` blocks; ``valid`` ``[b, n]`` (bool) masks padded tokens out of attention
    (the first token, which is pooled, must be valid)."""
    mask = None
    if valid is not None:
        heads = visual.transformer.resblocks[-1].attn.num_heads
        blocked = torch.zeros(valid.shape, dtype=tokens.dtype, device=tokens.device)
        blocked = blocked.masked_fill(~valid, float("-inf"))  # keys that may not be attended
        mask = blocked[:, None, None, :].expand(-1, heads, valid.shape[1], -1).flatten(0, 1)
    resblocks = visual.transformer.resblocks
    x = _blocks(visual, tokens, resblocks[len(resblocks) - last_blocks :], mask)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """f1's patch tokens ``[b, 1 + g*g, w]`` as a feature map ``[b, w, g, g]``."""
    patches = tokens[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise SplitError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
