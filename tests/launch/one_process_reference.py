"""The number a multi-rank recipe test compares against: step 1's loss of ONE process on the
global batch that the ranks of a run read at step 1.

The ranks' streams are rebuilt here exactly as :mod:`launch.run` builds them (same config, same
seeded model and objective, ``build_stream`` for each rank), and one process takes one step on
their first ``train.accum_steps`` micro-batches each, rank after rank, as ``world x accum_steps``
micro-batches of its own. vlp's contrastive core and GradCache are exact over the global batch,
and a per-micro-batch term (a captioning loss, averaged over each micro-batch's tokens as
CoCa's is) sees the same micro-batches, so the loss a 2-rank run logs must equal this one up to
float32 summation order: a rank that sees only local negatives, a term averaged per rank
instead of over the batch, or a micro-batch dropped from the accumulation moves it far beyond
that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from accelerate.utils import set_seed

from vlp.config import Config, load_config


def one_process_first_step_loss(config: Config, world: int, out: Path) -> float:
    """Step 1's ``train/loss`` of one process on the micro-batches ``world`` ranks read at
    step 1."""
    from launch.build import batch_fields, build_model, build_objective, build_stream
    from vlp.training import Trainer, create_accelerator

    accum = config.train.accum_steps
    objective = build_objective(config)
    set_seed(config.train.seed)  # where launch.run seeds: before the model is built
    model, preprocess_train, _, tokenizer, info = build_model(config)
    objective.use_tokenizer(tokenizer)
    parts = batch_fields(config, objective.fields(), model, preprocess_train, tokenizer)

    def ranks_micro_batches() -> Iterator[dict[str, Any]]:
        """Read when the trainer asks, as the ranks' streams are: after the heads are built."""
        for rank in range(world):
            stream = build_stream(config, parts, rank, world)
            if _first_step_has_fresh_views(objective, config, world):
                stream.fresh_views()
            batches = iter(stream)
            yield from (next(batches) for _ in range(accum))

    one = replace(
        config,
        train=replace(
            config.train,
            accum_steps=world * accum,
            steps=1,
            out_dir=str(out),
            report_to=[],
            checkpoint_every=0,
            resume=None,
        ),  # fmt: skip
        eval=replace(config.eval, zeroshot_shards=None, every=0),
    )
    trainer = Trainer(
        one, model, objective, ranks_micro_batches(),
        accelerator=create_accelerator(out, log_with=None),
        image_transform=parts.normalize, model_info=info,
    )  # fmt: skip
    return float(trainer.fit().last_losses["train/loss"])


def _first_step_has_fresh_views(objective: Any, config: Config, world: int) -> bool:
    """Whether the run's step 1 is pass 2 of an episode whose views were drawn afresh
    (ProtoCLIP's ``pass_two_views=fresh``): then the ranks trained on the stream's other draw."""
    from vlp.objectives.episodic import EpisodicObjective
    from vlp.training.episodes import episode_plan

    if not isinstance(objective, EpisodicObjective) or not objective.fresh_views():
        return False
    global_batch = config.data.batch_size * config.train.accum_steps * world
    plan = episode_plan(objective.episode_samples(), global_batch, config.train.steps)
    return objective.needs_features(0, plan.episodes)


def assert_first_loss_is_the_one_process_loss(
    out: Path, recipe: Path, overrides: Sequence[str], world: int = 2
) -> None:
    """The run in ``out`` (``recipe`` + ``overrides`` on ``world`` ranks) logged at step 1 the
    loss of one process on its global batch (float32: relative 1e-5)."""
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    logged = next(r for r in records if "train/loss" in r)  # after an episode's record
    assert logged["step"] == 1, logged
    config = load_config(recipe, list(overrides))
    expected = one_process_first_step_loss(config, world, out.parent / "one_process")
    assert logged["train/loss"] == pytest.approx(expected, rel=1e-5, abs=0), (logged, expected)
