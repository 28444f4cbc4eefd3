"""A resume keeps the checkpoint's optimizer moments and step counts, and the CURRENT config's
hyper-parameters (lr, weight decay, betas, eps): ``optimizer.load_state_dict`` would otherwise
silently bring back the old ones while config.yaml records the new ones."""

import logging

import pytest
import torch

from vlp.config import Config
from vlp.models import create_model
from vlp.objectives import create_objective
from vlp.training import Trainer, create_accelerator


def _fit(tmp_path, steps, **optim):
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model("vlp-tiny-vit")
    config = Config()
    config.train.out_dir = str(tmp_path)
    config.train.steps, config.train.resume = steps, "latest"
    config.train.report_to = []
    config.optim.warmup_steps = 2
    for key, value in optim.items():
        setattr(config.optim, key, value)
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": tokenizer(["a red star", "a blue ring", "a cross", "a heart"]),
    }
    trainer = Trainer(
        config, model, create_objective("clip"), [batch],
        accelerator=create_accelerator(tmp_path, log_with=None), model_info={},
    )  # fmt: skip
    trainer.fit()
    return trainer


def _params(trainer):
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def test_resume_uses_the_configs_optimizer_settings_and_says_what_changed(tmp_path, caplog):
    first = _fit(tmp_path, 2, lr=1e-3, weight_decay=0.1, beta2=0.98)
    moments = [first.optimizer.state[p]["exp_avg"].clone() for p in _params(first)]
    with caplog.at_level(logging.INFO):
        resumed = _fit(tmp_path, 2, lr=5e-4, weight_decay=0.05, beta2=0.95)
    assert resumed.step == 2
    decay, no_decay = resumed.optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for group in (decay, no_decay):
        assert group["initial_lr"] == 5e-4 and group["betas"] == (0.9, 0.95)
        # past warmup (2 steps of a 2-step run): the cosine's end, of the NEW base lr
        assert group["lr"] == pytest.approx(5e-4 * resumed.scheduler.scheduler.lr_lambdas[0](2))
    assert resumed.scheduler.scheduler.base_lrs == [5e-4, 5e-4]
    assert resumed.scheduler.get_last_lr() == [g["lr"] for g in (decay, no_decay)]
    # the moments and step counts are the checkpoint's
    for param, before in zip(_params(resumed), moments, strict=True):
        torch.testing.assert_close(resumed.optimizer.state[param]["exp_avg"], before)
        assert int(resumed.optimizer.state[param]["step"]) == 2
    (line,) = [r.getMessage() for r in caplog.records if "optimizer settings" in r.getMessage()]
    assert "lr 0.001 → 0.0005" in line
    assert "weight_decay 0.1 → 0.05" in line
    assert "betas (0.9, 0.98) → (0.9, 0.95)" in line


def test_resume_with_the_same_settings_says_nothing(tmp_path, caplog):
    _fit(tmp_path, 1, lr=1e-3)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, 1, lr=1e-3)
    assert not [r.getMessage() for r in caplog.records if "optimizer settings" in r.getMessage()]
