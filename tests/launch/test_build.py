"""launch.build: the data section becomes the stream's settings, every key of it accounted for."""

from __future__ import annotations

import dataclasses

from data_pipelines.stream_settings import StreamSettings
from launch.build import stream_settings
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
}
ELSEWHERE = {"train_shards", "text_key", "caption_field"}
"""The shard URLs are make_train_stream's first argument; the caption's source goes into the
text fields (launch.build.batch_fields)."""


def test_every_data_key_reaches_the_stream() -> None:
    keys = {f.name for f in dataclasses.fields(DataConfig)}
    assert keys == set(TO_SETTINGS) | ELSEWHERE, "a new data.* key must reach the stream"


def test_stream_settings_take_each_value_of_the_data_section_and_the_seed() -> None:
    changed = {
        "batch_size": 7, "workers": 3, "prefetch_factor": 5, "resampled": False,
        "shuffle_buffer": 11, "shards_in_flight": 2, "train_weights": [1.0, 2.5],
        "image_keys": ["png"], "max_skip_fraction": 0.25, "batch_timeout": 9.0,
        "remote_timeout": 4.0, "remote_retries": 6,
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
