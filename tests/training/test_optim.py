"""Optimizer groups (no decay on biases, norms, logit scale) and the warmup + cosine schedule."""

import math

import pytest

from vlp.config import OptimConfig
from vlp.models import create_model
from vlp.training.optim import WarmupCosine, create_optimizer


def test_no_weight_decay_on_biases_norms_and_logit_scale():
    model, *_ = create_model("vlp-tiny-vit")
    optimizer = create_optimizer(model, OptimConfig(weight_decay=0.3))
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.3 and undecayed["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert "logit_scale" in undecayed_names
    assert "visual.ln_pre.weight" in undecayed_names
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in undecayed_names
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in undecayed_names
    assert len(decayed["params"]) + len(undecayed["params"]) == len(names)


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(110) == pytest.approx(0.0)
