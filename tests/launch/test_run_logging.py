"""A run's log handlers live as long as the run: a process that trains twice (a notebook, the
test suite) keeps its own handlers, and no later line goes to a stream an earlier run used."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

from launch.build import StartupError
from launch.run import train
from vlp.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_leaves_the_processs_logging_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = logging.getLogger()
    mine = logging.StreamHandler(io.StringIO())
    root.addHandler(mine)
    before = list(root.handlers), root.level, logging.getLogger("vlp").level
    closed = io.StringIO()
    monkeypatch.setattr(sys, "stderr", closed)
    config = load_config(ROOT / "launch/configs/demo.yaml", [f"train.out_dir={tmp_path / 'run'}"])
    try:
        with pytest.raises(StartupError, match="train_shards is empty"):
            train(config)  # fails at the data check, inside the run's logging
        after = list(root.handlers), root.level, logging.getLogger("vlp").level
        closed.close()
        logging.getLogger("vlp.training").warning("a line after the run")  # no handler of the run
    finally:
        root.removeHandler(mine)
    assert after == before
    assert "a line after the run" in mine.stream.getvalue()
