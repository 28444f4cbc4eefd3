"""Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on a
GPU) in every shipped ViT config: each attention module of the image tower, the open_clip text
tower and CoCa's decoder calls it once per training forward.

The configs are those the recipes name (``launch/configs/*.yaml``), vlp's own and the issue's
benchmark models, each cut to one block per tower with its attention settings kept (width,
heads, pooler, masks). The ResNet configs (RN50, ConVIRT's timm ResNet-50) have no ViT; the
Hugging Face text towers (BERT, MiniLM) choose their attention in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import Attention
from torch import nn

from vlp.models import model_config
from vlp.models.factory import resolve_model_name

VIT_CONFIGS = (
    "vlp-tiny-vit",
    "vlp-tiny-vit-64",
    "vlp-tiny-coca",
    "vlp-tiny-coca-procedural",
    "coca_ViT-B-32",
    "ViT-B-32",
    "ViT-B-16",
)


def _one_block_each(name: str) -> dict[str, Any]:
    config = model_config(name)
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        if tower in config:
            config[tower]["layers"] = 1
    return config


def _attention_modules(module: nn.Module) -> int:
    return sum(isinstance(m, nn.MultiheadAttention | Attention) for m in module.modules())


def _sdpa_calls(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> int:
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", counted)
        run()
    return len(calls)


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_every_attention_module_calls_sdpa(name, tmp_path, monkeypatch):
    path = tmp_path / f"{name}-1-block.json"
    path.write_text(json.dumps(_one_block_each(name)))
    with torch.device("meta"):  # shapes only: no weights drawn, no arithmetic
        model = open_clip.create_model(resolve_model_name(str(path)), device="meta").train()
        images = torch.randn(2, 3, *model.visual.image_size)
        text = torch.zeros(2, model_config(name)["text_cfg"]["context_length"], dtype=torch.long)
    text_tower = model.text if hasattr(model, "text") else model.transformer
    visual_calls = _sdpa_calls(monkeypatch, lambda: model.visual(images))
    assert visual_calls == _attention_modules(model.visual)
    text_calls = _sdpa_calls(monkeypatch, lambda: model.encode_text(text))
    assert text_calls == _attention_modules(text_tower)
    every = _attention_modules(model)
    assert every > 0
    assert _sdpa_calls(monkeypatch, lambda: model(images, text)) == every
