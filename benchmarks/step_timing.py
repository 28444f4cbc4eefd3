"""What both sides of ``gpu_throughput.py`` measure, the same way: per-step data wait and compute,
samples/s over the steady steps, peak GPU memory, model FLOPs per sample.

Imports nothing of vlp (the open_clip side runs in open_clip's own environment, with this folder
on its path).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    next_batch: Callable[[], Any],
    step: Callable[[Any], Any],
    device: torch.device,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """Run ``warmup`` then ``steps`` timed steps; each step's data wait (``next_batch``, on the
    device) and compute (``step``, synchronised) in seconds, their medians and samples/s
    (``batch_size`` is read from the step's return, the samples it trained on)."""
    for _ in range(warmup):
        step(next_batch())
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    waits, computes, samples = [], [], 0
    for _ in range(steps):
        started = time.perf_counter()
        batch = next_batch()
        synchronize(device)
        loaded = time.perf_counter()
        samples = step(batch)
        synchronize(device)
        waits.append(loaded - started)
        computes.append(time.perf_counter() - loaded)
    totals = [w + c for w, c in zip(waits, computes, strict=True)]
    return {
        "samples_per_s": samples / statistics.median(totals),
        "step_s": statistics.median(totals),
        "data_wait_s": statistics.median(waits),
        "compute_s": statistics.median(computes),
        "data_wait_fraction": sum(waits) / sum(totals),
        "peak_memory_gib": peak_memory_gib(device),
    }


def ceiling(step: Callable[[Any], Any], batch: Any, device: torch.device, steps: int) -> float:
    """Samples/s of ``step`` on one batch already on the device: the compute-only ceiling."""
    step(batch)
    synchronize(device)
    started = time.perf_counter()
    samples = 0
    for _ in range(steps):
        samples += step(batch)
    synchronize(device)
    return samples / (time.perf_counter() - started)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most GPU memory torch held since the last reset, in GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def forward_flops(forward: Callable[[], Any]) -> int:
    """FLOPs of one call of ``forward`` (matrix products, convolutions, attention), counted by
    torch's ``FlopCounterMode``; a training step costs about 3x the forward."""
    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    return int(counter.get_total_flops())


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bf16 autocast on the device for ``bf16`` (open_clip_train's ``amp_bf16``), else none."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def emit(result: dict[str, Any]) -> None:
    """The side's result as the last line of its output (the orchestrator reads it)."""
    print(json.dumps(result), flush=True)
