"""The run directory (``train.out_dir``): claimed by a fresh run, laid out, and appended to.

A fresh run must not mix into an earlier run's folder (its metrics would be appended to, its
checkpoints pruned by step order), so it refuses a folder that holds checkpoints unless
``train.overwrite`` says to clear it. Every start then writes the resolved config and the
provenance, and every logged value goes to the trackers and to ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator

from vlp import run_folder
from vlp.config import Config
from vlp.training import checkpoint as ckpt
from vlp.training.provenance import provenance
from vlp.training.trainer_checkpoint import ResumeError

logger = logging.getLogger(__name__)

SUBDIRS = (run_folder.CHECKPOINTS, "results", "plots")
LOCK_NAME = ".vlp-run.lock"


class RunFolderInUse(RuntimeError):
    """Another live training run holds ``train.out_dir``."""


@contextlib.contextmanager
def hold_run_folder(path: Path) -> Iterator[None]:
    """Hold ``path`` for one run while the block runs (main process): a second run into the
    same folder, started while this one lives, stops at once instead of mixing its metrics
    and checkpoints into this one's.

    An ``flock`` on ``path/.vlp-run.lock``, which names its holder (host and pid): the kernel
    releases it when the holder exits, however it exits (``kill -9`` included), so a crashed
    run never leaves the folder locked. (On a network file system without working ``flock``,
    a second run is not detected.)

    Raises:
        RunFolderInUse: another process holds the folder; the message names it.
    """
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "another process"
            raise RunFolderInUse(
                f"train.out_dir='{path}' is in use by another training run ({holder}); wait "
                "for it to end, or pick another train.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


class RunDir:
    """One run's folder, seen from every rank; files are written by the main process.

    Args:
        path: ``train.out_dir``.
        accelerator: the run's Accelerator (which rank writes, and the barriers around it).
    """

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path = path
        self.accelerator = accelerator
        self.checkpoints = run_folder.checkpoints_dir(path)
        self.metrics = path / "metrics.jsonl"

    def claim(self, overwrite: bool) -> None:
        """A fresh run (no ``train.resume``) refuses a folder that holds checkpoints, unless
        ``overwrite`` (``train.overwrite``): then the old run's checkpoints and metrics go first."""
        existing = run_folder.list_checkpoints(self.checkpoints)
        if existing and not overwrite:
            raise ResumeError(
                f"train.out_dir='{self.path}' already holds a run (checkpoint "
                f"{existing[-1].name}); continue it with train.resume=latest, pick a new "
                "train.out_dir, or replace it with train.overwrite=true"
            )
        acc = self.accelerator
        acc.wait_for_everyone()  # every rank has looked before the main process deletes
        if existing and acc.is_main_process:
            logger.warning("train.overwrite=true: removing the run in %s", self.path)
            for sub in SUBDIRS:
                shutil.rmtree(self.path / sub, ignore_errors=True)
            for stale in (self.metrics, *self.path.glob("data_skips_*")):
                stale.unlink(missing_ok=True)
        acc.wait_for_everyone()

    def prepare(self, config: Config, step: int, global_batch: int) -> None:
        """Make the sub-folders, drop stale checkpoint temporaries, write ``config.yaml`` and
        ``provenance.json`` (a run starting at step 0 also drops an old ``metrics.jsonl``), and
        start the trackers."""
        acc = self.accelerator
        if acc.is_main_process:
            for sub in SUBDIRS:
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoints)
            config.save(self.path / "config.yaml")
            if step == 0:  # a fresh run: no loss history of an earlier run in this dir
                self.metrics.unlink(missing_ok=True)
            ckpt.write_json(self.path / "provenance.json", provenance(acc, global_batch))
        acc.wait_for_everyone()
        acc.init_trackers("vlp")  # the trackers made by create_trackers (none for a check)

    def record(self, values: dict[str, float], step: int) -> None:
        """Send ``values`` to the trackers and append them to ``metrics.jsonl`` (main process)."""
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.metrics, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
