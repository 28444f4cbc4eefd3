"""The episode driver over 2 gloo processes: the ``episode_index`` pass 2 gives each sample is
its row in the features pass 1 gathered over the ranks, sample i of rank r's micro-batch m
at row (m·R + r)·b + i (:mod:`vlp.training.episodes`).

Kept light (no model, no data pipeline): every spawned rank imports this module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.ddp_helpers import run_on_ranks
from vlp.objectives.episodic import EPISODE_INDEX
from vlp.training.device_batches import DeviceBatches
from vlp.training.episodes import EpisodeDriver, EpisodePlan, episode_plan

WORLD = 2
# (batch size b, micro-batches per step, steps per episode): m runs over accum x steps values
SHAPES = [(1, 1, 3), (2, 2, 2), (3, 1, 4), (4, 3, 1)]
EPISODES = 2


def sample_id(rank: int, draw: int, i: int) -> int:
    """A number naming sample i of the ``draw``-th micro-batch rank ``rank``'s stream gives."""
    return rank * 100_000 + draw * 100 + i


class _Stream:
    """A resumable stream of one rank's numbered micro-batches of ``size`` samples; a sample's
    one feature is its :func:`sample_id`."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size, self.next = rank, size, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            draw, self.next = self.next, self.next + 1
            ids = [sample_id(self.rank, draw, i) for i in range(self.size)]
            yield {"__key__": [str(n) for n in ids], "image": torch.tensor(ids).double()[:, None]}

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next = state["next"]


class _Identity(torch.nn.Module):
    def forward(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"x": inputs["image"]}


class _Recorder:
    """An episodic objective that keeps what pass 1 gathered."""

    def __init__(self) -> None:
        self.gathered: torch.Tensor | None = None

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"image": batch["image"]}

    def needs_features(self, episode: int, episodes: int) -> bool:
        return True

    def episode_features(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        return {"x": outputs["x"]}

    def begin_episode(self, episode: int, episodes: int, features: Any) -> dict[str, Any]:
        self.gathered = features["x"][:, 0]
        return {}


def _pass_two_rows(rank: int, world: int) -> list[list[list[int]]]:
    """For every shape and episode, one record per pass-2 sample of this rank:
    ``[shape, episode, m, i, sample id, episode_index, id at that row of pass 1's gather]``,
    m counted here as the micro-batches this rank trained on in the episode."""
    records = []
    for shape, (size, accum, steps) in enumerate(SHAPES):
        plan = episode_plan(steps * accum * size * world, accum * size * world, EPISODES * steps)
        objective = _Recorder()
        driver = EpisodeDriver(
            objective,  # type: ignore[arg-type]
            plan,
            rank=rank,
            world_size=world,
            batch_size=size,
            accum_steps=accum,
        )
        feed = DeviceBatches(_Stream(rank, size), accum, torch.device("cpu"), ["image"], None)
        step = 0
        for episode in range(EPISODES):
            assert driver.due()
            _, stopped = driver.pass_one(
                _Identity(), feed, step, contextlib.nullcontext, lambda: False
            )
            assert not stopped and objective.gathered is not None
            assert len(objective.gathered) == plan.steps_per_episode * accum * size * world
            m = 0
            for _ in range(plan.steps_per_episode):
                micro = feed.next(step)
                driver.label(micro)
                for batch in micro:
                    for i, row in enumerate(batch[EPISODE_INDEX].tolist()):
                        own = int(batch["image"][i, 0])
                        seen = int(objective.gathered[row])
                        records.append([shape, episode, m, i, own, row, seen])
                    m += 1
                step += 1
    return records


@pytest.mark.slow  # the work is tiny: the time is each spawned rank importing vlp.training
def test_each_ranks_micro_batch_m_sample_i_is_row_m_r_b_i_of_the_gathered_episode():
    """R = 2; b from 1 to 4, 1 to 3 micro-batches per step, 3 or 4 micro-batches m per rank in
    an episode; two episodes each: pass 2's rows are (m·R + r)·b + i, they hold the very
    samples pass 1 gathered there, and the two ranks' rows cover the episode once each."""
    per_rank = run_on_ranks(_pass_two_rows, WORLD)
    for shape, (size, accum, steps) in enumerate(SHAPES):
        episode_samples = steps * accum * size * WORLD
        for episode in range(EPISODES):
            rows = []
            for r, records in enumerate(per_rank):
                mine = [x[2:] for x in records if x[:2] == [shape, episode]]
                assert len(mine) == steps * accum * size, (shape, episode, r)
                for m, i, own, row, seen in mine:
                    assert row == (m * WORLD + r) * size + i, (shape, episode, r, m, i)
                    assert seen == own, (shape, episode, r, m, i)
                    # the stream's own count: this episode's m-th micro-batch of rank r
                    assert own == sample_id(r, episode * steps * accum + m, i)
                    rows.append(row)
            assert sorted(rows) == list(range(episode_samples)), (shape, episode)


def test_another_layout_takes_over_only_at_an_episode_boundary() -> None:
    """Episodes of 4 steps, saved by a layout with 2 micro-batches per step per process and
    continued with 1: inside an episode it is refused, naming the boundary; at one (drawn
    all 4 steps, or none) the count is in this run's micro-batches."""
    plan = EpisodePlan(steps_per_episode=4, episodes=3)

    def driver(drawn: int) -> EpisodeDriver:
        made = EpisodeDriver(
            _Recorder(),  # type: ignore[arg-type]
            plan, rank=0, world_size=2, batch_size=4, accum_steps=1,
        )  # fmt: skip
        made.index, made.drawn = 1, drawn
        return made

    for drawn in (2, 4, 6):  # 1, 2, 3 steps of 2 micro-batches
        with pytest.raises(
            ValueError, match=r"steps into episode 1 \(of 4 steps\).*divisible by 4"
        ):
            driver(drawn).continue_with(2)
    for drawn, steps in ((0, 0), (8, 4)):
        continued = driver(drawn)
        continued.continue_with(2)
        assert continued.drawn == steps and continued.due() == (steps == 4)
    same = driver(3)
    same.continue_with(1)  # the layout it was saved with: nothing to convert
    assert same.drawn == 3
