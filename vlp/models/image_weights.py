"""Initial weights for the image tower alone, from a local file (``model.image_pretrained``).

ConVIRT starts its ResNet-50 from ImageNet weights; open_clip's timm towers would download
them (``timm_model_pretrained``), which a machine without a network cannot. A file of the
tower's weights (timm's or torchvision's ``resnet50`` state dict, or an open_clip ``visual``)
is read without pickle, matched by name to the image tower (its timm ``trunk`` when it has
one), and copied in: every parameter of the tower must be found with its shape; what the tower
lacks (an ImageNet classifier ``fc``) is left out and said.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vlp.models.factory import PretrainedError

REQUIRED = "required"
"""A recipe's ``model.image_pretrained`` when it must not start from random weights."""

_PREFIXES = ("module.", "model.", "visual.", "trunk.")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedError(f"model.image_pretrained={path}: not a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _own_name(key: str, own: dict[str, torch.Tensor]) -> str | None:
    """``key`` as the tower names it, with a wrapper's prefixes taken off; None if no match."""
    while key not in own:
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        key = key[len(prefix) :]
    return key


def load_image_weights(model: nn.Module, path: str) -> str:
    """Copy the image tower's weights from ``path`` (safetensors, or a torch file read with
    ``weights_only``) into ``model.visual`` (its ``trunk`` for timm towers); returns a line
    saying what was loaded and what of the file was left out.

    Raises:
        PretrainedError: the file is missing or unreadable, misses a parameter of the tower,
            or has one with another shape.
    """
    file = Path(path)
    if not file.is_file():
        raise PretrainedError(f"model.image_pretrained={path}: no such file")
    visual: nn.Module = model.visual  # type: ignore[assignment]
    tower: nn.Module = getattr(visual, "trunk", visual)
    own = tower.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in _read(file).items():
        name = _own_name(key, own)
        if name is None:
            unused.append(key)
            continue
        if tuple(own[name].shape) != tuple(value.shape):
            raise PretrainedError(
                f"model.image_pretrained={path}: '{key}' has shape {tuple(value.shape)}, the "
                f"image tower's '{name}' {tuple(own[name].shape)}"
            )
        loaded[name] = value.to(own[name].dtype)
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedError(
            f"model.image_pretrained={path}: {len(missing)} of the image tower's "
            f"{len(own)} tensors are not in it (e.g. {', '.join(missing[:3])}); is it the "
            "weights of this architecture?"
        )
    with torch.no_grad():
        tower.load_state_dict({**own, **loaded})
    left = f"; left out of the file: {', '.join(unused[:4])}" if unused else ""
    left += f" (+{len(unused) - 4} more)" if len(unused) > 4 else ""
    return f"image tower: {len(loaded)} tensors from {path}{left}"
