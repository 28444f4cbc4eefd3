"""``optim.name``: StableAdamW against a reference written from the paper, 8-bit state size and
which parameters keep fp32 moments, exact resume of every optimizer, and a resume into another
optimizer's state layout."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.training.one_batch_runs import fit_one_batch, write_model_config
from vlp.config import OPTIMIZERS, ConfigError, OptimConfig, load_config
from vlp.training import Trainer
from vlp.training.adamw8bit import dequantise_moments, quantise_moments
from vlp.training.optim import create_optimizer
from vlp.training.stable_adamw import StableAdamW

BETAS, EPS, LR, DECAY = (0.9, 0.99), 1e-6, 1e-2, 0.1


def _reference_stable_adamw(param, grads):
    """StableAdamW as Algorithm 2 of Wortsman et al. (2023) writes it: the moments carry their
    bias correction in β̂_t = β(1 − β^(t−1)) / (1 − β^t); the lr is divided by
    max(1, √mean(g² / max(u, ε²))). Returns the parameter after each step and each RMS."""
    beta1, beta2 = BETAS
    first, second = torch.zeros_like(param), torch.zeros_like(param)
    params, rms = [], []
    for t, grad in enumerate(grads, start=1):
        beta1_hat = beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1**t)
        beta2_hat = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
        first = beta1_hat * first + (1 - beta1_hat) * grad
        second = beta2_hat * second + (1 - beta2_hat) * grad**2
        rms.append(math.sqrt((grad**2 / second.clamp(min=EPS**2)).mean().item()))
        lr = LR / max(1.0, rms[-1])
        param = param * (1 - LR * DECAY) - lr * first / (second.sqrt() + EPS)
        params.append(param)
    return params, rms


def test_stable_adamw_equals_the_papers_algorithm_with_and_without_clipping():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(64, dtype=torch.float64, generator=generator)
    base = 0.01 * torch.randn(64, dtype=torch.float64, generator=generator)
    grads = [base * 0.9**t for t in range(5)]  # shrinking: g² below the second moment, no clip
    grads[3] = base * 300  # far above what the second moment has seen: the lr is clipped
    expected, rms = _reference_stable_adamw(start, grads)
    assert rms[3] > 1 and max(rms[:3] + rms[4:]) <= 1, rms
    param = nn.Parameter(start.clone())
    optimizer = StableAdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY)
    for grad, want in zip(grads, expected, strict=True):
        param.grad = grad
        optimizer.step()
        torch.testing.assert_close(param.detach(), want, rtol=1e-12, atol=1e-15)


def test_stable_adamw_is_torch_adamw_bit_for_bit_when_nothing_clips():
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(32, 16, generator=generator)
    base = torch.randn(32, 16, generator=generator)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    stable = StableAdamW([ours], lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY)
    adamw = torch.optim.AdamW(
        [theirs], lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, foreach=False
    )
    for t in range(4):
        ours.grad, theirs.grad = base * 0.9**t, base * 0.9**t  # shrinking: RMS <= 1
        stable.step()
        adamw.step()
        assert torch.equal(ours, theirs)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(stable.state[ours][key], adamw.state[theirs][key])


class _Tower(nn.Module):
    """Big matrices (8-bit moments), a small one, biases, a norm and a logit scale (fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(256, 1024), nn.Linear(1024, 256)
        self.small = nn.Linear(16, 16)  # 256 elements: under 4,096
        self.ln = nn.LayerNorm(256)
        self.logit_scale = nn.Parameter(torch.tensor(2.6))


def _stepped(name: str, model: nn.Module) -> torch.optim.Optimizer:
    optimizer = create_optimizer(model, OptimConfig(name=name, lr=1e-3))
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the per-parameter state (bitsandbytes' shared quantisation maps not counted)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if torch.is_tensor(value) and not key.startswith("qmap")
    )


@pytest.mark.parametrize("name", ["adamw8bit", "stable_adamw8bit"])
def test_8bit_state_is_under_0_3_of_adamws_and_small_or_undecayed_tensors_keep_fp32(name):
    model = _Tower()
    ratio = _state_bytes(_stepped(name, model)) / _state_bytes(_stepped("adamw", model))
    assert ratio <= 0.3
    optimizer = _stepped(name, model)
    dtypes = {n: optimizer.state[p]["state1"].dtype for n, p in model.named_parameters()}
    eight_bit = {n for n, dtype in dtypes.items() if dtype == torch.uint8}
    assert eight_bit == {"up.weight", "down.weight"}
    assert all(dtypes[n] == torch.float32 for n in dtypes.keys() - eight_bit)


def test_an_unknown_optimizer_name_is_one_clear_line():
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["optim.name=adam8bit"])
    assert str(error.value) == (
        "optim.name must be one of adamw, stable_adamw, adamw8bit, stable_adamw8bit, got 'adam8bit'"
    )


# ---------------------------------------------------------------- resume, in-process Trainer

MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 512, "width": 64, "heads": 2, "layers": 1},
}
"""A tiny CLIP (~130k parameters) whose attention and MLP matrices are over 4,096 elements."""


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> str:
    return write_model_config(tmp_path_factory.mktemp("model"), "vlp-optim-test", MODEL)


def _fit(model_config: str, out: Path, steps: int, name: str, resume: str = "") -> Trainer:
    overrides = ["train.checkpoint_every=1", "train.keep_checkpoints=3", f"optim.name={name}"]
    return fit_one_batch(
        model_config, out, steps, overrides + ([f"train.resume={resume}"] if resume else [])
    )


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_continues_every_optimizer_bit_for_bit(model_config, tmp_path, name):
    _fit(model_config, tmp_path / "whole", 3, name)
    resumed = _fit(
        model_config, tmp_path / "resumed", 3, name, str(_checkpoint(tmp_path / "whole", 1))
    )
    assert resumed.step == 3
    for file in ("model.safetensors", "optimizer.safetensors", "optimizer.json"):
        whole = (_checkpoint(tmp_path / "whole", 3) / file).read_bytes()
        assert (_checkpoint(tmp_path / "resumed", 3) / file).read_bytes() == whole, file


@pytest.mark.parametrize(
    "saved, wanted, said",
    [
        ("adamw", "adamw8bit", "adamw fp32 moments quantised to 8 bits for optim.name=adamw8bit"),
        ("stable_adamw8bit", "adamw", "stable_adamw8bit moments dequantised to fp32"),
    ],
)
def test_a_checkpoint_of_the_other_layout_is_converted_and_says_so(
    model_config, tmp_path, caplog, saved, wanted, said
):
    _fit(model_config, tmp_path, 1, saved)
    with caplog.at_level(logging.INFO):
        resumed = _fit(model_config, tmp_path, 2, wanted, "latest")
    assert resumed.step == 2
    assert [r for r in caplog.records if said in r.getMessage()]
    model = resumed.accelerator.unwrap_model(resumed.model)
    state = resumed.optimizer.state[model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight]
    if wanted == "adamw8bit":
        assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    else:
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_quantised_moments_dequantise_to_within_a_blocks_resolution():
    generator = torch.Generator().manual_seed(2)
    first = torch.randn(64, 128, generator=generator) * 1e-3
    second = torch.rand(64, 128, generator=generator) * 1e-6
    state = {"w": {"step": torch.tensor(3.0), "exp_avg": first, "exp_avg_sq": second}}
    quantised = quantise_moments(state, lambda name: True)
    assert quantised["w"]["step"] == 3
    back = dequantise_moments(quantised)["w"]
    assert back["step"].item() == 3.0
    for key, moment in (("exp_avg", first), ("exp_avg_sq", second)):
        blocks = moment.reshape(-1, 256).abs().amax(dim=1, keepdim=True)
        error = (back[key] - moment).abs().reshape(-1, 256) / blocks
        assert error.max() < 0.05, key
