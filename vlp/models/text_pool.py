"""How a text embedding is read off the text tower's tokens: open_clip's end-of-text token, or a
max over every position (PyramidCLIP).

open_clip's text tower takes the ``ln_final`` output at the end-of-text token (``eot``, the
highest token id) and projects it. The official PyramidCLIP model (Yuting-Gao/PyramidCLIP
``models/models.py``, ``encode_text``) takes the maximum over ALL ``context_length`` positions of
the ``ln_final`` output (padding positions included) and then projects (``max``). A model trained
one way must be evaluated the same way: :class:`vlp.models.vlp_model.VlpModel` applies its
``text_pool`` in ``encode_text``, which training and every evaluator call, and checkpoints and
exports record it (the objective's ``text_pool`` setting). open_clip loading the weights alone
knows nothing of it and pools the end-of-text token.

Only open_clip's own text transformer (``CLIP``'s, or a ``TextTransformer`` without a class
token or padding mask) is max-pooled: a Hugging Face tower has its own pooler.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import nn

TEXT_POOLS = ("eot", "max")
"""``eot``: open_clip's own pooling (the end-of-text token); ``max``: max over all positions."""


def _text_tower(clip: Any) -> Any:
    """The module holding the text transformer's parts (``CLIP`` itself, or its ``text``)."""
    tower = getattr(clip, "text", clip)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(hasattr(tower, name) for name in needed):
        raise ValueError(
            f"text_pool=max needs open_clip's own text transformer; this model's text tower is "
            f"{type(tower).__name__} (a Hugging Face tower pools by its own pooler): set "
            "text_pool=eot"
        )
    if isinstance(tower, TextTransformer) and (tower.cls_emb is not None or tower.use_pad_mask):
        raise ValueError(
            "text_pool=max needs a text transformer without a class token or padding mask "
            "(text_cfg.embed_cls / pad_id); set text_pool=eot"
        )
    return tower


def check_text_pool(clip: nn.Module, pool: str) -> None:
    """Refuse an unknown ``pool``, or ``max`` on a text tower it cannot pool (ValueError)."""
    if pool not in TEXT_POOLS:
        raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got '{pool}'")
    if pool == "max":
        _text_tower(clip)


def max_pooled_text(clip: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Text embeddings ``[b, embed_dim]`` of token ids ``[b, context_length]``: the tower's
    ``ln_final`` output max-pooled over every position, then projected (PyramidCLIP's
    ``encode_text``). Same signature as open_clip's ``encode_text``."""
    tower = _text_tower(clip)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
    pooled = x.max(dim=1).values
    projection = tower.text_projection
    if isinstance(projection, nn.Linear):
        pooled = projection(pooled)
    elif projection is not None:
        pooled = pooled @ projection
    return F.normalize(pooled, dim=-1) if normalize else pooled
