"""Model creation over open_clip's factory, plus vlp's own tiny configs for CPU work.

A user names a model the way open_clip does (a built-in name, ``local-dir:``, ``hf-hub:``) or
gives a path to an open_clip model-config JSON; vlp registers its own tiny configs from
``model_configs/`` so that CPU runs need no download.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from vlp.models.tokenizers import SentencePieceTokenizer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_vlp_configs() -> None:
    """Make vlp's tiny model configs known to open_clip by name (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def resolve_model_name(name_or_config: str) -> str:
    """Turn a model-config JSON path into a registered open_clip name; pass names through."""
    register_vlp_configs()
    if name_or_config.endswith(".json"):
        path = Path(name_or_config)
        if not path.is_file():
            raise FileNotFoundError(f"model config file '{path}' does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if ":" in name_or_config:  # local-dir: / hf-hub: schemas, resolved by open_clip
        return name_or_config
    if open_clip.get_model_config(name_or_config) is None:
        raise ValueError(
            f"unknown model '{name_or_config}': not an open_clip model config, a model-config "
            "JSON path, or a 'local-dir:'/'hf-hub:' name. See open_clip.list_models()."
        )
    return name_or_config


def model_config(name_or_config: str) -> dict[str, Any]:
    """The open_clip model config dict behind a name (what checkpoints and exports record)."""
    name = resolve_model_name(name_or_config)
    if name.startswith("local-dir:"):
        config_file = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
        return dict(json.loads(config_file.read_text())["model_cfg"])
    if name.startswith("hf-hub:"):
        return dict(open_clip.factory._get_hf_config(name.removeprefix("hf-hub:"))["model_cfg"])
    return dict(open_clip.get_model_config(name))


def create_model(
    name_or_config: str,
    pretrained: str | None = None,
    *,
    lock_image: bool = False,
    lock_text: bool = False,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Callable[..., torch.Tensor], Callable[..., torch.Tensor], Any]:
    """Build ``(model, preprocess_train, preprocess_val, tokenizer)`` from an open_clip name.

    The model returns a dict (``image_features``, ``text_features``, ``logit_scale`` = s, and
    ``logit_bias`` for SigLIP models), the contract every objective relies on. ``pretrained`` is
    an open_clip tag (needs a network once) or a local weights file (works offline).
    ``tokenizer`` is a local SentencePiece ``.model`` file replacing open_clip's tokenizer.
    ``model_kwargs`` override the model config (an objective's needs, e.g. SigLIP's
    ``init_logit_bias``); record them with the config (``model_config(...) | model_kwargs``).
    """
    name = resolve_model_name(name_or_config)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained or None, device=device, output_dict=True,
        **(model_kwargs or {}),
    )  # fmt: skip
    if lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if tokenizer is None:
        return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)
    text_cfg = model_config(name).get("text_cfg", {})
    sentencepiece = SentencePieceTokenizer(tokenizer, text_cfg.get("context_length", 77))
    sentencepiece.check_text_config(text_cfg)
    return model, preprocess_train, preprocess_val, sentencepiece


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing (size, mean/std, resize mode) that belongs with the model's weights."""
    return dict(open_clip.get_model_preprocess_cfg(model))
