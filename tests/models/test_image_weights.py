"""``model.image_pretrained``: the image tower's own weights from a local file (ConVIRT's
ImageNet ResNet-50 offline), matched by name, every parameter required, no pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from launch.build import StartupError, build_model
from vlp.config import load_config
from vlp.models import PretrainedError, create_model
from vlp.models.image_weights import load_image_weights

ROOT = Path(__file__).resolve().parents[2]


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, *_ = create_model("vlp-tiny-vit")
    return model


def test_the_tower_takes_the_file_s_weights_and_nothing_else(tmp_path: Path) -> None:
    source, target = _tiny(1), _tiny(0)
    text_before = {
        k: v.clone() for k, v in target.state_dict().items() if not k.startswith("visual.")
    }
    # as a wrapper saved it, with a classifier the tower lacks
    state = {f"module.{k}": v for k, v in source.visual.state_dict().items()}
    save_file(state | {"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    line = load_image_weights(target, str(tmp_path / "w.safetensors"))
    assert "left out of the file: fc.weight" in line
    for key, value in source.visual.state_dict().items():
        assert torch.equal(target.visual.state_dict()[key], value), key
    for key, value in text_before.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_a_file_of_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    target = _tiny(0)
    partial = dict(list(_tiny(1).visual.state_dict().items())[:3])
    save_file(partial, str(tmp_path / "part.safetensors"))
    with pytest.raises(PretrainedError, match="tensors are not in it .*this architecture"):
        load_image_weights(target, str(tmp_path / "part.safetensors"))
    key, value = next(iter(_tiny(1).visual.state_dict().items()))
    save_file({key: torch.zeros(*value.shape, 2)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(PretrainedError, match=f"'{key}' has shape"):
        load_image_weights(target, str(tmp_path / "shape.safetensors"))


def test_the_convirt_recipe_refuses_to_start_from_random_weights() -> None:
    """The paper's ResNet-50 starts from ImageNet: without a file the recipe stops at start-up
    in one line naming the key and how to make the file (null trains from random weights)."""
    config = load_config(ROOT / "launch" / "configs" / "convirt.yaml", ["data.train_shards=x"])
    with pytest.raises(StartupError, match="model.image_pretrained: .*resnet50.*or to null"):
        build_model(config)


def test_the_convirt_recipe_starts_from_a_timm_resnet50_file(tmp_path: Path) -> None:
    """timm's resnet50 state dict (its ImageNet classifier included) goes into open_clip's timm
    trunk; the projection after it stays as built."""
    import timm

    torch.manual_seed(3)
    imagenet = timm.create_model("resnet50", pretrained=False).state_dict()
    save_file(imagenet, str(tmp_path / "resnet50.safetensors"))
    overrides = [
        "data.train_shards=x",
        f"model.image_pretrained={tmp_path / 'resnet50.safetensors'}",
    ]
    model, *_ = build_model(load_config(ROOT / "launch" / "configs" / "convirt.yaml", overrides))
    trunk = model.visual.trunk.state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in imagenet.items() if k in trunk)
    assert "fc.weight" not in trunk and len(trunk) == len(imagenet) - 2
