"""The speed settings of the loop: ``optim.fused`` (torch's fused AdamW kernel) and
``train.compile`` (the towers compiled in place): the same losses and weights as the plain path
within float rounding, the choice logged, checkpoint names unchanged, and a resume that continues
the run. On the CPU the compiled test uses torch.compile's ``eager`` backend (graph capture
without code generation: ~1 s instead of ~10 s for ``aot_eager``, a minute for ``inductor``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.one_batch_runs import fit_one_batch, write_model_config
from vlp.config import Config, ConfigError, load_config
from vlp.training import Trainer
from vlp.training.optim import fused_choice

MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> str:
    return write_model_config(tmp_path_factory.mktemp("model"), "vlp-fast-paths-test", MODEL)


def _fit(model_config: str, out: Path, steps: int, *overrides: str) -> Trainer:
    return fit_one_batch(
        model_config, out, steps, ["train.checkpoint_every=0", "train.log_every=1", *overrides]
    )


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def plain(model_config, tmp_path_factory) -> Path:
    """3 steps with neither setting: the reference run."""
    out = tmp_path_factory.mktemp("plain")
    _fit(model_config, out, 3, "optim.fused=false")
    return out


def test_fused_adamw_trains_as_the_unfused_one_logs_its_choice_and_resumes_into_it(
    model_config, plain, tmp_path, caplog
):
    first = _fit(model_config, tmp_path, 1, "optim.fused=false")
    assert first.optimizer.param_groups[0]["fused"] is None
    with caplog.at_level(logging.INFO, "vlp.training.optim"):
        fused = _fit(model_config, tmp_path, 3, "optim.fused=true", "train.resume=latest")
    assert fused.step == 3
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert "optimizer adamw, fused kernel (optim.fused=true)" in caplog.text
    # the unfused run's step counts became the fused kernel's (float32 on the parameter's device)
    assert all(s["step"].dtype == torch.float32 for s in fused.optimizer.state.values())
    assert _losses(tmp_path) == pytest.approx(_losses(plain), abs=1e-5)
    _assert_close(_weights(tmp_path, 3), _weights(plain, 3), 1e-5)


def test_fused_auto_is_cuda_only_and_true_needs_torchs_adamw():
    config = Config().optim
    assert fused_choice(config, "cuda") == (True, "optim.fused=auto on cuda")
    assert fused_choice(config, "cpu") == (False, "optim.fused=auto on cpu")
    config.name = "stable_adamw"
    assert fused_choice(config, "cuda") == (False, "optim.name=stable_adamw has no fused kernel")
    with pytest.raises(ConfigError, match="optim.fused=true needs optim.name=adamw"):
        load_config(None, ["optim.name=adamw8bit", "optim.fused=true"])
    with pytest.raises(ConfigError, match="optim.fused must be one of auto, true, false"):
        load_config(None, ["optim.fused=always"])


def test_compiled_towers_train_like_eager_ones_and_resume_with_unchanged_names(
    model_config, plain, tmp_path
):
    compiled_run = ("optim.fused=false", "train.compile=true", "train.compile_backend=eager")
    compiled = _fit(model_config, tmp_path, 1, *compiled_run)
    visual = compiled.accelerator.unwrap_model(compiled.model).clip.visual
    assert visual._compiled_call_impl is not None  # compiled in place, not wrapped
    assert _weights(tmp_path, 1).keys() == _weights(plain, 3).keys()
    resumed = _fit(model_config, tmp_path, 3, *compiled_run, "train.resume=latest")
    assert resumed.step == 3
    assert _losses(tmp_path) == pytest.approx(_losses(plain), abs=1e-5)
    _assert_close(_weights(tmp_path, 3), _weights(plain, 3), 1e-5)
