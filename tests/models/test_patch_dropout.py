"""``model.patch_dropout`` (FLIP): a ViT's patch tokens are dropped in training and all kept in
evaluation; towers that cannot drop patches (a ResNet) and PyramidCLIP's split ViT refuse it by
name."""

from __future__ import annotations

import json

import pytest
import torch

from vlp.config import ConfigError, load_config
from vlp.models import create_model
from vlp.objectives import create_objective

VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1},
}
RESNET = VIT | {"vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}}


def _model_file(tmp_path, config: dict) -> str:
    path = tmp_path / "vlp-patch-dropout-test.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_patches_are_dropped_in_training_only(tmp_path):
    model, *_ = create_model(_model_file(tmp_path, VIT), patch_dropout=0.5)
    seen = []
    blocks = model.visual.transformer.resblocks
    blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    images = torch.randn(2, 3, 32, 32)
    model.train()(images, None)
    model.eval()(images, None)
    assert seen == [1 + 8, 1 + 16]  # class token + half of the 4x4 patches; then all of them


def test_a_tower_without_patches_and_pyramidclip_refuse_it_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"model.patch_dropout=0.5 .* is ModifiedResNet"):
        create_model(_model_file(tmp_path, RESNET), patch_dropout=0.5)
    model, *_ = create_model(_model_file(tmp_path, VIT), patch_dropout=0.5)
    with pytest.raises(ValueError, match="set model.patch_dropout=0"):
        create_objective("pyramidclip").build_model(model)
    with pytest.raises(ConfigError, match=r"model.patch_dropout must be in \[0, 1\)"):
        load_config(None, ["model.patch_dropout=1.0"])
