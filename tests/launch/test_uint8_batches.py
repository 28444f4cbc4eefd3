"""``data.uint8_batches``: the data workers send uint8 views (normalised once on the device) or
normalised float32 ones, the same images to the bit either way, for every view an objective
declares (PyramidCLIP's global, local and ROI views here); so the same loss. On CUDA the stream
pins its batches; ``auto`` takes uint8 there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import data_pipelines.stream as stream_module
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.build import (
    StartupError,
    StreamParts,
    batch_fields,
    build_model,
    build_objective,
    build_stream,
    uint8_choice,
)
from tests.launch.one_process_reference import one_process_first_step_loss
from vlp.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "launch" / "configs" / "pyramidclip_demo.yaml"
VIEWS = ("global", "local", "roi")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(generate_samples(16, seed=0), out, samples_per_shard=8)
    return out


def _config(shards: Path, out: Path, uint8: str, workers: int = 0) -> Config:
    return load_config(
        RECIPE,
        [
            f"data.train_shards={shards}", "data.batch_size=4", f"data.workers={workers}",
            "data.shuffle_buffer=4", f"data.uint8_batches={uint8}", f"train.out_dir={out}",
            "optim.warmup_steps=1",
        ],
    )  # fmt: skip


def _parts(config: Config, device: str = "cpu") -> StreamParts:
    objective = build_objective(config)
    model, preprocess_train, _, tokenizer, _ = build_model(config)
    objective.use_tokenizer(tokenizer)
    return batch_fields(config, objective.fields(), model, preprocess_train, tokenizer, device)


def _first_batch(config: Config, parts: StreamParts) -> dict[str, Any]:
    return next(iter(build_stream(config, parts, 0, 1)))


@pytest.mark.slow  # ~3 s: two streams, each through a data worker process
def test_uint8_views_normalised_on_the_device_equal_the_workers_float_views(shards, tmp_path):
    uint8_config = _config(shards, tmp_path, "true", workers=1)
    float_config = _config(shards, tmp_path, "false", workers=1)
    uint8_parts, float_parts = _parts(uint8_config), _parts(float_config)
    assert uint8_parts.normalize is not None and float_parts.normalize is None
    uint8_batch = _first_batch(uint8_config, uint8_parts)
    float_batch = _first_batch(float_config, float_parts)
    assert uint8_batch["__key__"] == float_batch["__key__"]
    for view in VIEWS:
        assert uint8_batch[view].dtype == torch.uint8, view  # as the worker process sent it
        assert float_batch[view].dtype == torch.float32, view
        normalised = uint8_parts.normalize(uint8_batch[view])
        assert torch.equal(normalised, float_batch[view]), view  # bit for bit


@pytest.mark.slow  # ~4 s: two one-step PyramidCLIP runs
def test_one_step_gives_the_same_loss_from_uint8_and_float_batches(shards, tmp_path):
    losses = {
        uint8: one_process_first_step_loss(
            _config(shards, tmp_path / uint8, uint8), 1, tmp_path / f"{uint8}_run"
        )
        for uint8 in ("true", "false")
    }
    assert losses["true"] == losses["false"]


def test_auto_takes_uint8_on_cuda_only_and_true_needs_the_uint8_path() -> None:
    assert uint8_choice("auto", "cuda") == (True, "data.uint8_batches=auto on cuda")
    assert uint8_choice("auto", torch.device("cpu"))[0] is False
    assert uint8_choice("true", "cpu")[0] and not uint8_choice("false", "cuda")[0]
    assert uint8_choice(True, "cpu")[0]  # type: ignore[arg-type]  # YAML's true
    assert uint8_choice("auto", "cuda", "resize_mode 'longest'")[0] is False
    with pytest.raises(StartupError, match="data.uint8_batches=true needs .* 'longest'"):
        uint8_choice("true", "cuda", "resize_mode 'longest'")
    with pytest.raises(ConfigError, match="data.uint8_batches must be one of auto, true, false"):
        load_config(None, ["data.uint8_batches=sometimes"])


def test_on_cuda_the_stream_pins_its_batches_and_sends_uint8(shards, tmp_path, monkeypatch):
    config = _config(shards, tmp_path, "auto")
    parts = _parts(config, device="cuda")  # resolved only: nothing runs on the device
    assert parts.pin_memory and parts.normalize is not None
    assert not _parts(config).pin_memory
    made: list[dict[str, Any]] = []

    def loader(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real(*args, **{**kwargs, "pin_memory": False})  # no CUDA here to pin for

    real = stream_module.DataLoader
    monkeypatch.setattr(stream_module, "DataLoader", loader)
    batch = _first_batch(config, parts)
    assert made[0]["pin_memory"] is True
    assert all(batch[view].dtype == torch.uint8 for view in VIEWS)
