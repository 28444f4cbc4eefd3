"""Run a function on N gloo ranks on the CPU and collect what each rank returns."""

from __future__ import annotations

import gc
import os
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    timeout_s: float,
    torchrun_env: bool,
    out_dir: str,
    fn: Callable,
    args: tuple,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torchrun_env:  # an Accelerator made inside ``fn`` then joins this group
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"{rank}.pt"))
        gc.collect()  # drop DDP reducers and their gloo work before the group goes away
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_s: float = 1800.0,
    torchrun_env: bool = False,
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo processes; returns the per-rank results.

    ``fn`` must be a module-level function (it is pickled by name into spawned processes).
    ``timeout_s`` bounds each collective (torch's default: 30 minutes), so that a test of a rank
    left waiting fails in seconds instead of hanging. ``torchrun_env`` also sets torchrun's
    ``RANK``/``WORLD_SIZE`` variables, so that an Accelerator made in ``fn`` spans the ranks (a
    Trainer then runs under DDP, as under ``accelerate launch``); without them each rank's
    Accelerator sees one process.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        spawn_args = (world, _free_port(), timeout_s, torchrun_env, out_dir, fn, args)
        mp.spawn(_entry, args=spawn_args, nprocs=world, join=True)
        return [
            torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True) for r in range(world)
        ]
