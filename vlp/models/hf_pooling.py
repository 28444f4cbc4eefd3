"""Max pooling over the valid tokens of a Hugging Face text tower, for open_clip.

ConVIRT (Zhang et al., 2022, §3.3) max-pools the text encoder's output vectors. open_clip's own
``max_pooler`` (``open_clip/hf_model.py``, open_clip 3.3.0) cannot do it: it passes the integer
attention mask to ``masked_fill``, which torch >= 2.1 refuses ("masked_fill_ only supports
boolean masks"), and the mask it fills is the one of the *valid* tokens, so even with a boolean
mask it would max over the padding (upstream fix proposed, not merged: open_clip PR #665).

Importing this module registers :class:`MaxPooler` under open_clip's name ``max_pooler``, in
open_clip's pooler registry (``open_clip.hf_model.register_pooler``), the same way open_clip
registers its own poolers; ``vlp.models`` imports it, so every open_clip model built after
``import vlp.models`` (configs with ``"hf_pooler_type": "max_pooler"``) pools correctly. The
pooler has no parameters: state dicts are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.hf_model import register_pooler
from torch import nn


@register_pooler
class MaxPooler(nn.Module):
    """Per feature, the maximum of ``last_hidden_state`` over the tokens whose mask is 1.

    ``x.last_hidden_state``: ``[B, L, D]``; ``attention_mask``: ``[B, L]`` (1 = token,
    0 = padding, any integer or bool dtype). Returns ``[B, D]``. Every row must hold at least
    one token (a BERT tokenizer always adds ``[CLS]``).
    """

    def forward(self, x: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = x.last_hidden_state
        padding = ~attention_mask.bool().unsqueeze(-1)
        # The dtype's lowest finite value, not -inf: a max over it is never chosen over a token.
        return hidden.masked_fill(padding, torch.finfo(hidden.dtype).min).amax(dim=1)
