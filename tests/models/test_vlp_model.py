"""VlpModel: heads are trained, checkpointed and applied by encode_*; frozen helpers are not
parameters, not in the state dict, not in the optimizer, not in a checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.ddp_helpers import run_on_ranks
from vlp.config import OptimConfig
from vlp.models import create_model
from vlp.models.vlp_model import VlpModel, join_clip_and_heads, split_clip_and_heads
from vlp.training.model_state import full_model_state
from vlp.training.optim import create_optimizer


def _model() -> VlpModel:
    torch.manual_seed(0)
    clip, *_ = create_model("vlp-tiny-vit")
    model = VlpModel(clip, {"image": nn.Linear(128, 16), "text": nn.Linear(128, 16)})
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 8))
    model.attach_frozen("teacher", teacher)
    return model


def test_frozen_helpers_are_outside_parameters_state_optimizer_and_checkpoints():
    model = _model()
    teacher = model.frozen("teacher")
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not any("teacher" in key for key in model.state_dict())
    optimizer = create_optimizer(model, OptimConfig())
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not teacher_params & in_groups
    assert {id(p) for p in model.heads.parameters()} <= in_groups
    clip_state, heads_state = split_clip_and_heads(full_model_state(model))
    assert sorted(heads_state) == ["image.bias", "image.weight", "text.bias", "text.weight"]
    assert set(clip_state) == set(model.clip.state_dict())  # what open_clip loads, unprefixed
    assert join_clip_and_heads(clip_state, heads_state).keys() == model.state_dict().keys()


def _ddp_parameters(rank: int, world: int) -> dict:
    model = _model()
    wrapped = nn.parallel.DistributedDataParallel(model)
    return {
        "count": sum(1 for _ in wrapped.parameters()),
        "own": sum(1 for _ in model.parameters()),
    }


def test_ddp_wraps_the_heads_and_not_the_frozen_helpers():
    (result,) = run_on_ranks(_ddp_parameters, 1)
    assert result["count"] == result["own"]
    assert result["own"] == sum(1 for _ in _model().clip.parameters()) + 4


def test_encode_applies_the_heads_and_reads_open_clip_attributes():
    model = _model()
    images = torch.randn(2, 3, 32, 32)
    expected = F.normalize(model.heads["image"](model.clip.encode_image(images)), dim=-1)
    torch.testing.assert_close(model.encode_image(images, normalize=True), expected)
    assert model.logit_scale is model.clip.logit_scale  # evaluators read open_clip's attributes
