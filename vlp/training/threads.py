"""How many intra-op threads torch uses per process, chosen from the cores this process may use.

The automatic choice is torch's own default (a thread per physical core) restricted to this
process's CPU affinity and shared between the training processes of the node, less the cores
that other programs keep busy when the run starts (measured). Data workers are not subtracted:
on the CPU a worker only has to keep up with the training step, so it sleeps most of the time
(a digits run, batch 64, tiny ViT, 1 worker on 2 cores: 193 s with one thread per process
against 140 s with two, bitwise the same model; benchmarks/RESULTS.md "End to end"). The
measurement keeps the case the split was first made for: beside another job on 2 shared cores,
two threads ran at 6 s/step against 94–110 samples/s with one. The choice is made once, before
the first step, so a run's arithmetic does not change under it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

import psutil
import torch

logger = logging.getLogger(__name__)

MEASURE_S = 0.3
"""How long the other programs' CPU use is sampled at start-up (this process sleeps meanwhile)."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def physical_cores(cores: int) -> int:
    """``cores`` logical CPUs counted as physical cores (torch's default thread count is one per
    physical core: hyper-threads share one core's arithmetic units)."""
    logical = psutil.cpu_count(logical=True) or cores
    physical = psutil.cpu_count(logical=False) or logical
    return max(1, cores * physical // logical)


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int]:
    """(busy, total) jiffies of ``cpus`` from ``/proc/stat``."""
    busy = total = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            busy += user + nice + system + irq + softirq + steal
            total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def busy_elsewhere(seconds: float = MEASURE_S) -> float:
    """Cores of this process's affinity kept busy by other programs, averaged over ``seconds``
    while this process sleeps; 0.0 where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        busy0, total0 = _cpu_jiffies(cpus)
        own0 = time.process_time()
        time.sleep(seconds)
        busy1, total1 = _cpu_jiffies(cpus)
        own = time.process_time() - own0
    except (AttributeError, OSError, ValueError):
        return 0.0
    if total1 <= total0:
        return 0.0
    busy_cores = (busy1 - busy0) / (total1 - total0) * len(cpus)
    return max(0.0, busy_cores - own / seconds)


def choose_threads(
    cores: int,
    local_processes: int,
    configured: int = 0,
    env: str | None = None,
    busy: Callable[[], float] | None = None,
) -> tuple[int, str]:
    """Intra-op threads per process and why: ``configured`` (``train.threads``) when > 0, else
    ``OMP_NUM_THREADS`` when set, else the node's free physical cores (``cores`` less what
    ``busy()``, default :func:`busy_elsewhere`, measures other programs using, rounded) shared by its ``local_processes``."""
    if configured > 0:
        return configured, f"train.threads={configured}"
    if env and env.strip().isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={int(env)}"
    local_processes = max(1, local_processes)
    others = (busy or busy_elsewhere)()
    free = max(1, physical_cores(cores) - round(others))
    threads = max(1, free // local_processes)
    return threads, (
        f"auto: {cores} cores, {others:.1f} busy with other programs, {local_processes} "
        "training process(es) on this node; set train.threads to choose"
    )


def set_threads(configured: int, environ: Mapping[str, str] | None = None) -> int:
    """Choose (:func:`choose_threads`), apply with ``torch.set_num_threads`` and log (INFO)."""
    environ = os.environ if environ is None else environ
    local = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, why = choose_threads(
        available_cores(), local, configured, environ.get("OMP_NUM_THREADS")
    )
    torch.set_num_threads(threads)
    logger.info("torch intra-op threads per process: %d (%s)", threads, why)
    return threads
