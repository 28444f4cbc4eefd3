"""An episode's pass 2 draws fresh augmented views of pass 1's samples (ProtoCLIP's official
behaviour), deterministically: two identical runs see the same views, and a stream saved during
pass 2 resumes into the same views; ``fresh_views=False`` replays pass 1's views
(:mod:`vlp.training.episodes`, :meth:`data_pipelines.stream.TrainStream.fresh_views`)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from data_pipelines.augment import build_preset
from data_pipelines.batch_fields import BatchFields
from data_pipelines.stream import TrainStream, make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from vlp.training.device_batches import DeviceBatches
from vlp.training.episodes import EpisodeDriver, episode_plan

BATCH, ACCUM, STEPS = 4, 2, 2  # an episode: 2 steps of 2 micro-batches of 4


def _tokens(texts: list[str]) -> torch.Tensor:
    return torch.zeros(len(texts), 4, dtype=torch.long)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("episode_views")
    write_shards(generate_samples(32, seed=0), out, samples_per_shard=8)
    return str(out)


def _stream(shards: str) -> TrainStream:
    view = build_preset("protoclip-light", 24)
    fields = BatchFields.single(view, _tokens, "txt")
    settings = StreamSettings(batch_size=BATCH, accum_steps=ACCUM, resampled=True, seed=3)
    return make_train_stream(shards, settings, fields=fields)


Views = list[tuple[str, torch.Tensor]]
"""(sample key, image) in stream order (a resampled episode may hold a sample twice)."""


class _Keep(torch.nn.Module):
    """Pass 1's model: records every image it encodes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Views = []

    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.seen += list(zip(inputs["__key__"], inputs["image"].clone(), strict=True))
        return {"x": inputs["image"].flatten(1)[:, :2].float()}


class _Objective:
    """The episodic contract, minimally: hands the keys to the model, gathers nothing useful."""

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"image": batch["image"], "__key__": batch["__key__"]}

    def needs_features(self, episode: int, episodes: int) -> bool:
        return True

    def episode_features(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        return {"x": outputs["x"]}

    def begin_episode(self, episode: int, episodes: int, features: Any) -> dict[str, Any]:
        return {}


def _episode(
    shards: str, fresh_views: bool, episodes: int = 2
) -> tuple[list[Views], list[Views], dict[str, Any]]:
    """Per episode, pass 1's and pass 2's views in order; and the stream's position after
    pass 2's first step of the last episode."""
    plan = episode_plan(STEPS * ACCUM * BATCH, ACCUM * BATCH, episodes * STEPS)
    driver = EpisodeDriver(
        _Objective(),  # type: ignore[arg-type]
        plan, rank=0, world_size=1, batch_size=BATCH, accum_steps=ACCUM, fresh_views=fresh_views,
    )  # fmt: skip
    feed = DeviceBatches(_stream(shards), ACCUM, torch.device("cpu"), ["image"], None)
    first, second, step, position = [], [], 0, {}
    for _ in range(episodes):
        model = _Keep()
        driver.pass_one(model, feed, step, contextlib.nullcontext, lambda: False)
        trained: Views = []
        for offset in range(STEPS):
            micro = feed.next(step)
            driver.label(micro)
            for batch in micro:
                trained += list(zip(batch["__key__"], batch["image"], strict=True))
            if offset == 0:
                position = feed.position()
            step += 1
        first.append(model.seen)
        second.append(trained)
    return first, second, position


def test_pass_two_draws_other_views_of_the_same_samples_and_two_runs_agree(shards: str) -> None:
    """Over two episodes: pass 2 trains on exactly pass 1's samples, each with another image
    tensor (the 'light' crop and flip differ); a second identical run gives every view bit for
    bit; replay (``fresh_views=False``) gives pass 1's views again."""
    first, second, _ = _episode(shards, fresh_views=True)
    again = _episode(shards, fresh_views=True)
    replay = _episode(shards, fresh_views=False)
    for episode in range(2):
        one, two = first[episode], second[episode]
        assert [k for k, _ in one] == [k for k, _ in two]
        assert len(one) == STEPS * ACCUM * BATCH
        assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(one, two, strict=True)), episode
        assert _same(one, again[0][episode]) and _same(two, again[1][episode])
        assert _same(replay[0][episode], replay[1][episode])
    assert _same(first[0], replay[0][0])  # pass 1 of episode 0 reads as any run does


def _same(a: Views, b: Views) -> bool:
    return len(a) == len(b) and all(
        ka == kb and torch.equal(x, y) for (ka, x), (kb, y) in zip(a, b, strict=True)
    )


def test_a_stream_saved_during_pass_two_resumes_into_its_fresh_views(shards: str) -> None:
    """The position after pass 2's first step records the fresh draw: a new stream loaded from
    it hands out the very views the run trained on next."""
    _, second, position = _episode(shards, fresh_views=True)
    stream = _stream(shards)
    stream.load_state_dict(position)
    feed = DeviceBatches(stream, ACCUM, torch.device("cpu"), ["image"], None)
    resumed: Views = []
    for batch in feed.next(STEPS * 2 - 1):
        resumed += list(zip(batch["__key__"], batch["image"], strict=True))
    assert _same(resumed, second[-1][ACCUM * BATCH :])
