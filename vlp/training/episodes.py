"""Episodes: a no-grad pass over an episode's samples before training on them (ProtoCLIP).

An :class:`~vlp.objectives.episodic.EpisodicObjective` trains in episodes of M samples, that is
S = M / global batch optimizer steps. An episode is the next M samples of the training stream;
with ``data.resampled`` (ProtoCLIP's recipes) the stream draws its shards with replacement,
seeded, so an episode is a seeded draw with replacement at the shard level. Nothing is held in
memory between the passes: the stream is read twice.

- **Pass 1** (when the previous episode's S × accum micro-batches are used up): remember the stream's position, draw the episode's S × accum
  micro-batches, encode them in eval mode without gradient (the views come augmented, as the
  stream made them for training), gather the objective's episode features over all ranks with
  :func:`vlp.distributed.all_gather`, and hand them to ``begin_episode`` (ProtoCLIP clusters
  them there). Then rewind the stream to the remembered position.
- **Pass 2** is the trainer's ordinary steps over the same samples; with ``fresh_views`` (the
  official ProtoCLIP code's behaviour, and the default of ``objective.protoclip.pass_two_views``)
  the stream draws each sample's augmentation anew, so a cluster label found on one view is
  learned from another (:meth:`data_pipelines.stream.TrainStream.fresh_views`: still a function
  of the sample's place in the stream, recorded in its position, so runs and resumes stay
  exact); without, it replays pass 1's views. The driver adds each
  sample's row in the gathered features as ``episode_index``: sample i of rank r in the
  episode's micro-batch m is row (m·R + r)·b + i. Episodes count micro-batches, not steps, so
  a step skipped for a non-finite loss does not shift the rows: the next episode then starts
  one step later.

Resume: the stream position and RNG states come from the checkpoint as always, and the
objective's episode state (labels, centroids) from ``episode.safetensors`` beside them, so a
resume during pass 2 does not redo pass 1 (the state holds the episode index and the
micro-batches drawn). At an episode boundary pass 1 runs again after the resume, from the same
position with the same weights. A stop requested during pass 1 rewinds the
stream to the episode's start before the checkpoint is written, so that resume redoes pass 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.distributed import all_gather, all_reduce_mean
from vlp.objectives.episodic import EPISODE_INDEX, PASS_ONE, EpisodicObjective
from vlp.training.device_batches import DeviceBatches

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclass(frozen=True)
class EpisodePlan:
    """How the run's steps fall into episodes."""

    steps_per_episode: int
    episodes: int
    """Episodes in ``train.steps`` (the last one may be cut short)."""


def episode_plan(samples: int, global_batch: int, steps: int) -> EpisodePlan:
    """S = M // global batch steps per episode: as the official ProtoCLIP loop, which drops an
    episode's incomplete last batch (200,000 samples at a global batch of 512: 390 steps of
    199,680), so a recipe starts at any global batch. Fewer samples than one step is an error."""
    if samples < global_batch:
        raise ValueError(
            f"an episode of {samples} samples is less than one step of the global batch "
            f"{global_batch} (data.batch_size x train.accum_steps x processes); use at least "
            f"{global_batch}"
        )
    per_episode = samples // global_batch
    return EpisodePlan(per_episode, math.ceil(steps / per_episode))


class EpisodeDriver:
    """Runs pass 1 of each episode and labels pass 2's batches (see the module docstring).

    Args:
        objective: the episodic objective.
        plan: steps per episode and episodes in the run.
        rank, world_size: this process and the number of processes.
        batch_size: ``data.batch_size``, every micro-batch's size.
        accum_steps: micro-batches per optimizer step.
        fresh_views: pass 2 draws new augmented views of the samples (the stream needs
            ``fresh_views()``); False replays pass 1's views.
    """

    def __init__(
        self,
        objective: EpisodicObjective,
        plan: EpisodePlan,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        accum_steps: int,
        fresh_views: bool = False,
    ) -> None:
        self.objective = objective
        self.fresh_views = fresh_views
        self.plan = plan
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.accum_steps = batch_size, accum_steps
        self._trained_since = time.perf_counter()
        self.index = -1
        """The episode set up last (-1: none yet)."""
        self.drawn = 0
        """Micro-batches of this rank drawn for training in that episode."""

    def due(self) -> bool:
        """Whether the next step needs a new episode (its pass 1 first)."""
        return self.index < 0 or self.drawn >= self.plan.steps_per_episode * self.accum_steps

    def pass_one(
        self,
        model: nn.Module,
        feed: DeviceBatches,
        step: int,
        autocast: Callable[[], AbstractContextManager[Any]],
        stop_requested: Callable[[], bool],
    ) -> tuple[dict[str, float], bool]:
        """Set up the next episode before step ``step + 1``: returns the values to log and whether
        a stop was requested (then the stream is back at the episode's start, nothing set up)."""
        episode, episodes = self.index + 1, self.plan.episodes
        train_s = time.perf_counter() - self._trained_since
        start = time.perf_counter()
        features = None
        if self.objective.needs_features(episode, episodes):
            position = feed.position()
            gathered, stopped = self._encode(model, feed, step, autocast, stop_requested)
            # A stop rewinds to the episode's start as it was: the resume redoes pass 1.
            feed.rewind(position, fresh_views=self.fresh_views and not stopped)
            if stopped:
                return {}, True
            features = {name: torch.cat(parts) for name, parts in gathered.items()}
        encode_s = time.perf_counter() - start
        begun = self.objective.begin_episode(episode, episodes, features)
        self.index, self.drawn = episode, 0
        logs = {k: float(v) for k, v in begun.items()}
        logs |= {"index": float(episode), "encode_s": encode_s, "train_s": train_s}
        if features is not None:
            logs["feature_mib"] = (
                sum(x.numel() * x.element_size() for x in features.values()) / 2**20
            )
        self._trained_since = time.perf_counter()
        return {f"episode/{k}": v for k, v in logs.items()}, False

    def _encode(
        self,
        model: nn.Module,
        feed: DeviceBatches,
        step: int,
        autocast: Callable[[], AbstractContextManager[Any]],
        stop_requested: Callable[[], bool],
    ) -> tuple[dict[str, list[torch.Tensor]], bool]:
        gathered: dict[str, list[torch.Tensor]] = {}
        model.eval()
        try:
            for offset in range(self.plan.steps_per_episode):
                for batch in feed.next(step + offset):
                    self._check_size(batch)
                    inputs = {**self.objective.model_inputs(batch), PASS_ONE: True}
                    with torch.no_grad(), autocast():
                        outputs = model(inputs)
                    for name, value in self.objective.episode_features(outputs, batch).items():
                        parts = all_gather(value.detach().float().contiguous())
                        gathered.setdefault(name, []).append(torch.cat(parts))
                flag = all_reduce_mean(torch.tensor([float(stop_requested())]))
                if flag[0] > 0:
                    return gathered, True
        finally:
            model.train()
        return gathered, False

    def label(self, micro_batches: list[Batch]) -> None:
        """Add ``episode_index`` (rows in the episode's gathered features) to the next step's
        micro-batches, in place, and count them as drawn."""
        for batch in micro_batches:
            self._check_size(batch)
            row = (self.drawn * self.world_size + self.rank) * self.batch_size
            device = batch["image"].device if "image" in batch else None
            batch[EPISODE_INDEX] = torch.arange(row, row + self.batch_size, device=device)
            self.drawn += 1

    def _check_size(self, batch: Batch) -> None:
        size = len(batch["__key__"])
        if size != self.batch_size:
            raise RuntimeError(
                f"episodes need full batches of data.batch_size={self.batch_size}; the stream "
                f"gave {size} samples"
            )

    def state(self) -> dict[str, torch.Tensor]:
        """Where the run is in its episodes and the objective's episode state, for
        ``episode.safetensors``."""
        position = {
            "episode.index": torch.tensor(self.index),
            "episode.drawn": torch.tensor(self.drawn),
        }
        return {**self.objective.episode_state(), **position} if self.index >= 0 else position

    def continue_with(self, saved_accum: int) -> None:
        """After :meth:`load` of a run with ``saved_accum`` micro-batches per step per process:
        count what was drawn in this run's micro-batches. Rows are labelled by process and
        micro-batch, so another layout can take over only at an episode boundary.

        Raises:
            ValueError: the checkpoint is inside an episode and the layout changed."""
        if saved_accum == self.accum_steps:
            return
        steps = self.drawn // saved_accum
        if 0 < steps < self.plan.steps_per_episode:
            raise ValueError(
                f"it is {steps} steps into episode {self.index} (of "
                f"{self.plan.steps_per_episode} steps); the episode's labels follow its "
                "processes and micro-batches, so resume on another number of processes from a "
                "checkpoint at an episode boundary (a step divisible by "
                f"{self.plan.steps_per_episode}), or on the processes that wrote it"
            )
        self.drawn = steps * self.accum_steps

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state` (a resume)."""
        self.index, self.drawn = int(state["episode.index"]), int(state["episode.drawn"])
        if self.index >= 0:
            own = {k: v for k, v in state.items() if not k.startswith("episode.")}
            self.objective.load_episode_state(self.index, self.plan.episodes, own)
