"""Run a function on N gloo ranks on the CPU and collect what each rank returns.

The rank processes are kept between calls (one pool per world size, per test process): each
call makes a fresh gloo group in them, runs the function with the caller's environment and
working directory, and restores what a run leaves behind (accelerate's and vlp's per-process
state, torch's default dtype, threads and seed). A spawned rank spends seconds importing torch,
open_clip and transformers before its first line: paid once per pool instead of once per test.
A rank that raises or dies takes its pool down (the others may wait in a collective); the next
call starts a new one.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MAX_POOLS = 2
"""Pools kept at once (the least recently used goes): each rank holds a few hundred MB."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ProcessState:
    """What a run may change in a rank process and the pool must put back before the next."""

    def __init__(self) -> None:
        self.seed = torch.initial_seed()
        self.threads = torch.get_num_threads()
        self.handlers = list(logging.getLogger().handlers)
        self.level = logging.getLogger().level

    def enter(self, environ: dict[str, str], cwd: str) -> None:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        torch.manual_seed(self.seed)  # a fresh process's default generator

    def restore(self) -> None:
        if "accelerate.state" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        if "vlp.distributed.groups" in sys.modules:  # groups of the destroyed default group
            sys.modules["vlp.distributed.groups"]._groups.clear()
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(self.threads)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in self.handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(self.level)
        gc.collect()


def _serve(rank: int, world: int, conn: Connection) -> None:
    """A rank process of a pool: run each task sent on ``conn`` and answer with None (its result
    is in the task's folder) or the formatted exception."""
    state = _ProcessState()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        fn, args, port, timeout_s, torchrun_env, out_dir, environ, cwd = task
        state.enter(environ, cwd)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if torchrun_env:  # an Accelerator made inside ``fn`` then joins this group
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_WORLD_SIZE=str(world))  # fmt: skip
        try:
            timeout = timedelta(seconds=timeout_s)
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
            try:
                torch.save(fn(rank, world, *args), os.path.join(out_dir, f"{rank}.pt"))
                gc.collect()  # drop DDP reducers and their gloo work before the group goes away
                if dist.is_initialized():  # a Trainer's fit() ends it (accelerate end_training)
                    dist.barrier()
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
        except BaseException:
            conn.send(traceback.format_exc())
            return
        state.restore()
        conn.send(None)


class _Pool:
    """``world`` rank processes waiting for tasks."""

    def __init__(self, world: int) -> None:
        context = mp.get_context("spawn")
        self.world = world
        self.conns: list[Connection] = []
        self.procs = []
        for rank in range(world):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_serve, args=(rank, world, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def run(
        self, fn: Callable[..., Any], args: tuple, timeout_s: float, torchrun_env: bool
    ) -> list:
        with tempfile.TemporaryDirectory() as out_dir:
            task = (fn, args, _free_port(), timeout_s, torchrun_env, out_dir, dict(os.environ),
                    os.getcwd())  # fmt: skip
            for conn in self.conns:
                conn.send(task)
            pending = dict(enumerate(self.conns))
            while pending:
                sentinels = {p.sentinel: r for r, p in enumerate(self.procs) if r in pending}
                ready: list[Any] = wait([*pending.values(), *sentinels])
                for r, conn in list(pending.items()):
                    if conn in ready and conn.poll():
                        error = conn.recv()
                        if error is not None:
                            raise RuntimeError(f"rank {r} of {self.world} raised:\n{error}")
                        del pending[r]
                for dead in [sentinels[s] for s in ready if s in sentinels]:
                    if dead in pending and not self.conns[dead].poll():
                        raise RuntimeError(f"rank {dead} of {self.world} died with exit code "
                                           f"{self.procs[dead].exitcode}")  # fmt: skip
            return [
                torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=True)
                for r in range(self.world)
            ]

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


_pools: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    while _pools:
        _pools.pop(next(iter(_pools))).close()


def run_on_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_s: float = 1800.0,
    torchrun_env: bool = False,
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo processes; returns the per-rank results.

    ``fn`` must be a module-level function (it is pickled by name into the rank processes).
    ``timeout_s`` bounds each collective (torch's default: 30 minutes), so that a test of a rank
    left waiting fails in seconds instead of hanging. ``torchrun_env`` also sets torchrun's
    ``RANK``/``WORLD_SIZE`` variables, so that an Accelerator made in ``fn`` spans the ranks (a
    Trainer then runs under DDP, as under ``accelerate launch``); without them each rank's
    Accelerator sees one process.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or died.
    """
    pool = _pools.pop(world, None) or _Pool(world)
    try:
        results = pool.run(fn, args, timeout_s, torchrun_env)
    except BaseException:
        for proc in pool.procs:  # the other ranks may wait in a collective for ever
            proc.kill()
        pool.close()
        raise
    _pools[world] = pool  # most recently used last
    while len(_pools) > MAX_POOLS:
        _pools.pop(next(iter(_pools))).close()
    return results
