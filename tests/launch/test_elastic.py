"""``launch.elastic.resume_layout``: a resume on another number of processes keeps the
checkpoint's global batch by its micro-batches per process, or says which process counts can."""

from __future__ import annotations

import json
import logging
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
