"""The model vlp trains: an open_clip model plus the trainable heads its objective adds.

Everything trainable lives here, so that DDP/FSDP wrapping, the optimizer's parameter groups,
checkpoints and ``vlp export`` see all of it without knowing the objective:

- ``clip``: the open_clip model, unchanged (its state dict is what open_clip loads);
- ``heads``: the objective's modules (projection MLPs, prototype heads, an ROI branch, a
  decoder). Heads named ``image`` / ``text`` map the towers' embeddings, and are applied by
  :meth:`VlpModel.encode_image` / :meth:`VlpModel.encode_text`, which evaluators call;
- ``text_pool``: how :meth:`VlpModel.encode_text` reads the text tower's tokens (``eot``,
  open_clip's; ``max`` for PyramidCLIP, :mod:`vlp.models.text_pool`), so that evaluators embed
  text as the objective trained it;
- frozen helpers (a teacher, a reference LM) are held OUTSIDE the module tree
  (:meth:`VlpModel.attach_frozen`): no parameters, no state-dict entries, no DDP buckets.

``forward(inputs)`` runs the objective's ``encode``, so one forward call goes through DDP/FSDP
whatever the objective computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.text_pool import check_text_pool, max_pooled_text

Encode = Callable[["VlpModel", Mapping[str, Any]], dict[str, torch.Tensor]]

HEADS_FILE = "heads.safetensors"
"""Checkpoint/export file of the heads, beside open_clip's ``model.safetensors``."""
CLIP_PREFIX = "clip."
HEADS_PREFIX = "heads."


class VlpModel(nn.Module):
    """open_clip model + objective heads; ``forward`` is the objective's model call.

    Args:
        clip: an open_clip model (``encode_image``, ``encode_text``, ``logit_scale``).
        heads: trainable modules of the objective, by name.
        encode: ``encode(model, inputs) -> outputs``, usually ``objective.encode``.
        text_pool: ``eot`` (open_clip's ``encode_text``) or ``max`` (:mod:`vlp.models.text_pool`).
    """

    clip: Any  # an open_clip model (CLIP, CustomTextCLIP, CoCa): typed loosely on purpose

    def __init__(
        self,
        clip: nn.Module,
        heads: Mapping[str, nn.Module] | None = None,
        encode: Encode | None = None,
        text_pool: str = "eot",
    ):
        super().__init__()
        check_text_pool(clip, text_pool)
        self.clip = clip
        self.text_pool = text_pool
        self.heads = nn.ModuleDict(dict(heads or {}))
        self._encode = encode
        self._frozen: dict[str, nn.Module] = {}

    def forward(
        self, inputs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """The objective's outputs for ``inputs`` (without an objective: open_clip's forward)."""
        inputs = {**(inputs or {}), **kwargs}
        if self._encode is None:
            return dict(self.clip(**inputs))
        return self._encode(self, inputs)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings, through the ``image`` head when there is one."""
        return self._embed("image", self.clip.encode_image, image, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings pooled as ``text_pool`` says, through the ``text`` head when there is
        one."""
        if self.text_pool == "max":
            return self._embed("text", partial(max_pooled_text, self.clip), text, normalize)
        return self._embed("text", self.clip.encode_text, text, normalize)

    def _embed(
        self, name: str, encode: Callable[..., torch.Tensor], x: torch.Tensor, normalize: bool
    ) -> torch.Tensor:
        if name not in self.heads:
            return encode(x, normalize=normalize)
        features = self.heads[name](encode(x, normalize=False))
        return F.normalize(features, dim=-1) if normalize else features

    def attach_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep a frozen helper (teacher, reference LM) beside the model, outside its module
        tree: not optimised, not wrapped by DDP/FSDP, not in checkpoints or exports."""
        module.requires_grad_(False).eval()
        self._frozen[name] = module
        return module

    def frozen(self, name: str) -> nn.Module:
        """A helper attached with :meth:`attach_frozen`."""
        return self._frozen[name]

    def __getattr__(self, name: str) -> Any:
        """open_clip attributes evaluators read (``logit_scale``, ``visual``...) from ``clip``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            clip = super().__getattr__("clip")
            return getattr(clip, name)


def split_clip_and_heads(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A VlpModel state dict as (open_clip's state dict, the heads' state dict), unprefixed."""
    clip = {k[len(CLIP_PREFIX) :]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    heads = {k[len(HEADS_PREFIX) :]: v for k, v in state.items() if k.startswith(HEADS_PREFIX)}
    other = set(state) - {CLIP_PREFIX + k for k in clip} - {HEADS_PREFIX + k for k in heads}
    if other:
        raise ValueError(f"state keys outside clip./heads.: {sorted(other)[:5]}")
    return clip, heads


def join_clip_and_heads(
    clip: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_clip_and_heads`."""
    return {CLIP_PREFIX + k: v for k, v in clip.items()} | {
        HEADS_PREFIX + k: v for k, v in heads.items()
    }
