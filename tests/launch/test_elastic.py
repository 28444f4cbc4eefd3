"""``launch.elastic.resume_layout``: a resume on another number of processes keeps the
checkpoint's global batch by its micro-batches per process, or says which process counts can."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from launch.build import StartupError
from launch.elastic import resume_layout
from vlp import run_folder
from vlp.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _config(out: Path, **overrides: object):  # type: ignore[no-untyped-def]
    values = {"train.out_dir": out, "data.batch_size": 8, "train.resume": "latest", **overrides}
    return load_config(
        ROOT / "launch" / "configs" / "demo.yaml", [f"{k}={v}" for k, v in values.items()]
    )


def _checkpoint(out: Path, processes: int, global_batch: int) -> None:
    path = run_folder.checkpoints_dir(out) / "step_00000003"
    path.mkdir(parents=True)
    state = {"step": 3, "world_size": processes, "global_batch": global_batch}
    (path / run_folder.TRAINER_STATE).write_text(json.dumps(state))
    (path / run_folder.COMPLETE).write_text("")


def test_another_process_count_sets_the_micro_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _checkpoint(tmp_path, processes=4, global_batch=64)  # 4 x 2 x 8
    with caplog.at_level(logging.INFO, logger="vlp"):
        resumed = resume_layout(_config(tmp_path, **{"train.accum_steps": 2}), processes=2)
    assert resumed.train.accum_steps == 4
    assert "train.accum_steps=4 (was 2) keeps the global batch of 64" in caplog.text
    same = _config(tmp_path, **{"train.accum_steps": 2})
    assert resume_layout(same, processes=4) is same  # the processes that wrote it
    assert (
        resume_layout(_config(tmp_path, **{"train.resume": ""}), processes=2).train.accum_steps == 1
    )


def test_a_process_count_that_cannot_make_the_global_batch_is_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path, processes=4, global_batch=64)  # 8 micro-batches of 8
    with pytest.raises(StartupError, match="resume on 1 or 2 or 4 or 8 processes"):
        resume_layout(_config(tmp_path), processes=3)


def test_rescale_lr_scales_the_learning_rate_by_the_global_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _checkpoint(tmp_path, processes=2, global_batch=32)  # 2 x 2 x 8
    asked = _config(tmp_path, **{"train.elastic": "rescale_lr", "optim.lr": 0.001})
    with caplog.at_level(logging.INFO, logger="vlp"):
        resumed = resume_layout(asked, processes=1)  # 1 x 1 x 8: a quarter of the batch
    assert resumed.train.accum_steps == 1 and resumed.optim.lr == pytest.approx(0.00025)
    assert "global batch 8 where checkpoint" in caplog.text and "has 32" in caplog.text
    assert resume_layout(_config(tmp_path, **{"train.elastic": "rescale_lr", "train.accum_steps": 4}), processes=1).optim.lr == 0.001  # fmt: skip


def test_a_run_resumed_at_another_global_batch_trains_on(tmp_path: Path) -> None:
    """3 steps at batch 8, then to step 5 at batch 16 with train.elastic=rescale_lr: the lr of
    steps 4 and 5 is twice the one the batch-8 run logs there, the stream is drawn afresh, and
    a later resume of that run continues its new sequence exactly. Without rescale_lr the
    resume is refused, naming it."""
    from data_pipelines.synthetic import generate_samples
    from data_pipelines.write import write_shards
    from launch.run import train

    shards = tmp_path / "shards"
    write_shards(generate_samples(48, seed=0), shards, samples_per_shard=8)

    def run(out: Path, steps: int, batch: int, **extra: object) -> dict[int, dict]:
        config = _config(
            out, **{"data.train_shards": shards, "data.workers": 0, "data.shuffle_buffer": 8,
                    "train.steps": steps, "train.log_every": 1, "train.checkpoint_every": 1,
                    "train.keep_checkpoints": 9, "train.report_to": "[]",
                    "optim.warmup_steps": 1, "data.batch_size": batch, "train.resume": None,
                    **extra},
        )  # fmt: skip
        train(config)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in records if "train/lr" in r}

    whole = run(tmp_path / "whole", 5, 8)
    name = "checkpoints/step_00000003"
    shutil.copytree(tmp_path / "whole" / name, tmp_path / "run" / name)  # stopped at step 3
    with pytest.raises(
        StartupError, match="global batch 8; this run has 16.*train.elastic=rescale_lr"
    ):
        run(tmp_path / "run", 5, 16, **{"train.resume": "latest"})
    rescaled = run(
        tmp_path / "run", 5, 16, **{"train.resume": "latest", "train.elastic": "rescale_lr"}
    )
    assert sorted(rescaled) == [4, 5]
    for step in (4, 5):
        assert rescaled[step]["train/lr"] == pytest.approx(2 * whole[step]["train/lr"])
    name = "checkpoints/step_00000004"
    shutil.copytree(tmp_path / "run" / name, tmp_path / "again" / name)
    continued = run(
        tmp_path / "again", 5, 16, **{"train.resume": "latest", "train.elastic": "rescale_lr"}
    )
    assert continued[5]["train/loss"] == rescaled[5]["train/loss"]
