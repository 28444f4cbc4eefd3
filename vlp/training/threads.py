"""How many intra-op threads torch uses per process, chosen from the cores this process may use.

torch's default (every core) oversubscribes a shared CPU: each training process and each data
worker then compete for the same cores, and one-process training on 2 shared cores ran at
6 s/step beside another job against 94–110 samples/s with one thread. The cores are split between
the processes of this node after the data workers have one each.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(
    cores: int, local_processes: int, workers: int, configured: int = 0, env: str | None = None
) -> tuple[int, str]:
    """Intra-op threads per process and why: ``configured`` (``train.threads``) when > 0, else
    ``OMP_NUM_THREADS`` when set, else ``max(1, (cores − local_processes·workers) //
    local_processes)``."""
    if configured > 0:
        return configured, f"train.threads={configured}"
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={int(env)}"
    local_processes = max(1, local_processes)
    threads = max(1, (cores - local_processes * workers) // local_processes)
    return threads, (
        f"auto: {cores} cores, {local_processes} process(es) on this node, {workers} data "
        "worker(s) each; set train.threads to choose"
    )


def set_threads(configured: int, workers: int, environ: Mapping[str, str] | None = None) -> int:
    """Choose (:func:`choose_threads`), apply with ``torch.set_num_threads`` and log (INFO)."""
    environ = os.environ if environ is None else environ
    local = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, why = choose_threads(
        available_cores(), local, workers, configured, environ.get("OMP_NUM_THREADS")
    )
    torch.set_num_threads(threads)
    logger.info("torch intra-op threads per process: %d (%s)", threads, why)
    return threads
