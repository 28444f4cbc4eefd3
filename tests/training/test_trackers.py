"""train.report_to -> accelerate trackers: TensorBoard under OUT/tensorboard, clear errors."""

from __future__ import annotations

import pytest
from accelerate.tracking import TensorBoardTracker

from vlp.training import accel


def test_tensorboard_writes_into_the_run_directory(tmp_path) -> None:
    [tracker] = accel.create_trackers(["tensorboard"], tmp_path)
    assert isinstance(tracker, TensorBoardTracker)
    tracker.start()
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    assert accel.create_trackers([], tmp_path) == []


def test_a_tracker_without_its_package_stops_at_start_up(tmp_path, monkeypatch) -> None:
    """accelerate alone would drop it with a debug line and log nothing."""
    monkeypatch.setattr(accel, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match="tracker 'wandb' needs its package"):
        accel.create_trackers(["wandb"], tmp_path)


def test_an_unknown_tracker_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'.*'tensorboard'"):
        accel.create_trackers(["tensorbored"], tmp_path)
