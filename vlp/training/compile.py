"""``train.compile``: the open_clip towers compiled in place with ``torch.compile``.

``nn.Module.compile`` compiles a module's forward without wrapping it (``torch.compile(module)``
would return an ``OptimizedModule`` whose state-dict names gain ``_orig_mod.``), so parameters,
checkpoints, exports and resumes keep their names, and DDP/FSDP wrap the same module tree. Only
the towers are compiled: the objective's heads and losses are small, and the exact contrastive
core runs collectives that graph capture would break on. Code that calls a tower's blocks
directly (PyramidCLIP's split ViT) runs them uncompiled.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

TOWERS = ("visual", "transformer", "text", "text_decoder")
"""open_clip's tower attributes: the image tower, CLIP's text transformer, CustomTextCLIP's
and CoCa's text tower, CoCa's captioning decoder."""


def compile_towers(model: nn.Module, backend: str = "inductor") -> list[str]:
    """Compile every open_clip tower of ``model`` (a VlpModel or an open_clip model) in place
    with ``backend``; returns and logs (INFO) the towers compiled."""
    clip = getattr(model, "clip", model)
    names = [name for name in TOWERS if isinstance(getattr(clip, name, None), nn.Module)]
    for name in names:
        getattr(clip, name).compile(backend=backend)
    logger.info("torch.compile (backend %s) of the towers: %s", backend, ", ".join(names))
    return names
