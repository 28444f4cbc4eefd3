"""One live run per ``train.out_dir``: a second run stops at once, naming the first; a run
killed with ``kill -9`` leaves nothing locked."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from vlp.training.run_dir import LOCK_NAME, RunFolderInUse, hold_run_folder

FORK = multiprocessing.get_context("fork")  # another process, without importing torch again


def _hold(folder: Path, held: Any) -> None:
    with hold_run_folder(folder):
        held.set()
        time.sleep(600)


def _holder(folder: Path) -> Any:
    """Another process holding ``folder`` as a live run does."""
    held = FORK.Event()
    process = FORK.Process(target=_hold, args=(folder, held), daemon=True)
    process.start()
    assert held.wait(timeout=120)
    return process


def _try_to_hold(folder: Path, queue: Any) -> None:
    try:
        with hold_run_folder(folder):
            queue.put("held")
    except RunFolderInUse as error:
        queue.put(str(error))


def test_a_second_run_names_the_live_one_and_a_killed_one_frees_the_folder(tmp_path) -> None:
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        with pytest.raises(RunFolderInUse, match=rf"in use by .*pid {holder.pid}\)"):
            with hold_run_folder(folder):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=60)
    with hold_run_folder(folder):  # the kernel released the dead holder's lock
        assert f"pid {os.getpid()}" in (folder / LOCK_NAME).read_text()


def test_the_folder_is_held_for_the_whole_block_and_free_after_it(tmp_path) -> None:
    folder = tmp_path / "run"
    queue = FORK.Queue()
    with hold_run_folder(folder):
        probe = FORK.Process(target=_try_to_hold, args=(folder, queue))
        probe.start()
        assert f"pid {os.getpid()}" in queue.get(timeout=120)
        probe.join(timeout=60)
    probe = FORK.Process(target=_try_to_hold, args=(folder, queue))
    probe.start()
    assert queue.get(timeout=120) == "held"
    probe.join(timeout=60)
