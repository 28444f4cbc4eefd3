"""`vlp train --check --world-size N`: what a run would do on N processes, checked without
starting them.

A recipe written for 8 GPUs must not first fail on the 8 GPUs: what depends on the number of
processes is the global batch, the contrastive group size, the canonical streams (epoch mode
needs a shard for each of them) and an episodic objective's steps per episode. Each is checked
here with the same rule the run applies (no model is built, no data is read beyond the shard
list), so that a plan is a few milliseconds and a test can plan every shipped recipe at the
sizes its header documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipelines.shards import split_sources
from data_pipelines.stream import stream_period
from launch.build import StartupError, build_objective
from vlp.config import Config
from vlp.distributed.groups import check_group_size
from vlp.objectives.episodic import EpisodicObjective
from vlp.training.episodes import episode_plan


@dataclass
class WorldPlan:
    """A run of ``steps`` optimizer steps on ``world_size`` processes."""

    world_size: int
    global_batch: int
    """data.batch_size x train.accum_steps x processes."""
    streams: int
    """Canonical streams (``data.streams``, or processes x accum_steps x data.workers)."""
    steps: int
    samples_seen: int
    steps_per_episode: int | None = None
    """An episodic objective's steps per episode (its incomplete last batch dropped)."""
    notes: list[str] = field(default_factory=list)
    """What could not be checked without the data (said, not guessed)."""


def plan_world(config: Config, world_size: int) -> WorldPlan:
    """Check ``config`` for ``world_size`` processes and describe the run.

    Raises:
        StartupError: the run would stop at start-up on that many processes (one line: what
            and the setting that fixes it).
    """
    if world_size < 1:
        raise StartupError(f"--world-size must be >= 1, got {world_size}")
    data, train = config.data, config.train
    global_batch = data.batch_size * train.accum_steps * world_size
    try:
        check_group_size(train.group_size, world_size)
        period = stream_period(data.streams, world_size, train.accum_steps, data.workers)
    except ValueError as error:
        raise StartupError(f"on {world_size} processes: {error}") from None
    plan = WorldPlan(
        world_size=world_size,
        global_batch=global_batch,
        streams=world_size * train.accum_steps * period,
        steps=train.steps,
        samples_seen=global_batch * train.steps,
    )
    objective = build_objective(config)
    if isinstance(objective, EpisodicObjective):
        try:
            episodes = episode_plan(objective.episode_samples(), global_batch, train.steps)
        except ValueError as error:
            raise StartupError(f"on {world_size} processes: {error}") from None
        plan.steps_per_episode = episodes.steps_per_episode
    if data.resampled:
        return plan
    if not data.train_shards:
        plan.notes.append("data.train_shards is not set: the epoch's shard count is not checked")
        return plan
    try:
        shards = len(split_sources(data.train_shards, data.train_weights)[0])
    except (FileNotFoundError, ValueError) as error:
        raise StartupError(f"data.train_shards: {error}") from None
    if shards < plan.streams:
        raise StartupError(
            f"on {world_size} processes: epoch mode deals whole shards to {plan.streams} "
            f"streams (processes x train.accum_steps x data.workers) but data.train_shards has "
            f"{shards}; use more (smaller) shards, fewer workers or data.resampled=true"
        )
    return plan
