"""launch.build: the data section becomes the stream's settings, every key of it accounted for;
launch.sidecar_checks: the start-up data check runs on the main process only and every rank
raises its verdict."""

from __future__ import annotations

import dataclasses
import tarfile

import accelerate.utils
import pytest
import torch
import webdataset as wds
from safetensors.torch import save_file

from data_pipelines.batch_fields import BatchFields, ImageView, SidecarField, TextField
from data_pipelines.sidecar import write_sidecar
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.build import StartupError, stream_settings
from launch.sidecar_checks import check_data
from vlp.config import DataConfig, load_config

# DataConfig key -> StreamSettings field
TO_SETTINGS = {
    "batch_size": "batch_size",
    "workers": "workers",
    "prefetch_factor": "prefetch_factor",
    "resampled": "resampled",
    "shuffle_buffer": "shuffle_buffer",
    "shards_in_flight": "shards_in_flight",
    "train_weights": "weights",
    "image_keys": "image_keys",
    "max_skip_fraction": "max_skip_fraction",
    "batch_timeout": "timeout",
    "remote_timeout": "remote_timeout",
    "remote_retries": "remote_retries",
    "streams": "streams",
}
ELSEWHERE = {"train_shards", "text_key", "caption_field", "uint8_batches"}
"""The shard URLs are make_train_stream's first argument; the caption's source goes into the
text fields and the image dtype into the views (launch.build.batch_fields)."""


def test_every_data_key_reaches_the_stream() -> None:
    keys = {f.name for f in dataclasses.fields(DataConfig)}
    assert keys == set(TO_SETTINGS) | ELSEWHERE, "a new data.* key must reach the stream"


def test_stream_settings_take_each_value_of_the_data_section_and_the_seed() -> None:
    changed = {
        "batch_size": 7, "workers": 3, "prefetch_factor": 5, "resampled": False,
        "shuffle_buffer": 11, "shards_in_flight": 2, "train_weights": [1.0, 2.5],
        "image_keys": ["png"], "max_skip_fraction": 0.25, "batch_timeout": 9.0,
        "remote_timeout": 4.0, "remote_retries": 6, "streams": 8,
    }  # fmt: skip
    defaults = DataConfig()
    assert all(getattr(defaults, k) != v for k, v in changed.items())
    overrides = [f"data.{k}={v}" for k, v in changed.items()] + ["train.seed=13"]
    settings = stream_settings(load_config(None, overrides), draft_size=96)
    for key, value in changed.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(settings, TO_SETTINGS[key]) == expected, key
    assert settings.seed == 13 and settings.draft_size == 96
    untouched = StreamSettings(batch_size=1)
    for name in ("epoch", "extra_keys", "max_pixels", "max_consecutive_errors"):
        assert getattr(settings, name) == getattr(untouched, name), name


class _State:
    """An accelerate-like state of one rank of two (what check_data reads of it)."""

    def __init__(self, main: bool) -> None:
        self.num_processes, self.is_main_process = 2, main


def _sidecar_run(tmp_path, sidecar_keys):
    """A config over 20 samples in 3 shards, fields with a sidecar holding ``sidecar_keys``."""
    shards = tmp_path / "shards"
    write_shards(generate_samples(20, seed=0), shards, samples_per_shard=7)
    path = tmp_path / "teacher.safetensors"
    write_sidecar(path, {key: torch.zeros(2) for key in sidecar_keys})
    fields = BatchFields(views=(ImageView("image", lambda image: image),),
                         texts=(TextField("text", lambda texts: texts),),
                         sidecars=(SidecarField("teacher", str(path)),))  # fmt: skip
    config = load_config(None, [f"data.train_shards={shards}", "objective.name=clip"])
    return config, fields, {"teacher": "vlp protoclip teacher {shards} --out {path}"}


def test_only_the_main_process_checks_the_data_and_every_rank_raises_its_verdict(
    tmp_path, monkeypatch
) -> None:
    config, fields, commands = _sidecar_run(tmp_path, [f"{i:09d}" for i in range(17)])
    sent: list[list[str]] = []

    def broadcast(objects, from_process=0):  # rank 0's list reaches every rank
        if not sent:
            sent.append(list(objects))
        return sent[0]

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    reads: list[str] = []
    gopen, tar_open = wds.gopen, tarfile.open
    monkeypatch.setattr(wds, "gopen", lambda url, *a, **k: reads.append(url) or gopen(url, *a, **k))
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: reads.append("tar") or tar_open(*a, **k))
    with pytest.raises(StartupError) as main_error:
        check_data(config, fields, commands, _State(main=True))
    assert "3 of 20 training samples have no entry in sidecar 'teacher'" in str(main_error.value)
    assert reads  # the main process read the shards (the sidecar records none)
    reads.clear()
    with pytest.raises(StartupError) as other_error:
        check_data(config, fields, commands, _State(main=False))
    assert str(other_error.value) == str(main_error.value) and reads == []

    config, fields, commands = _sidecar_run(tmp_path / "whole", [f"{i:09d}" for i in range(20)])
    sent.clear()
    assert check_data(config, fields, commands, _State(main=True))  # the urls
    assert sent == [[""]]  # no error
    reads.clear()
    assert len(check_data(config, fields, commands, _State(main=False))) == 3
    assert reads == []


def test_an_old_sidecar_stops_the_start_up_with_the_command_that_converts_it(tmp_path) -> None:
    config, fields, commands = _sidecar_run(tmp_path, [])
    old = fields.sidecars[0].path
    save_file({f"{i:09d}": torch.zeros(2) for i in range(20)}, old)
    with pytest.raises(StartupError) as error:
        check_data(config, fields, commands)
    message = str(error.value)
    assert "\n" not in message and f"sidecar {old} is in the old format" in message
    assert message.endswith(f"convert it in place with: vlp shards convert-sidecar {old}")
