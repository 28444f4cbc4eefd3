"""Intra-op threads: torch's default within this process's cores, shared by the node's training
processes, less what other programs keep busy; data workers are not subtracted."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from vlp.training import threads as threads_module
from vlp.training.threads import available_cores, busy_elsewhere, choose_threads, set_threads


def idle() -> float:
    return 0.0


@pytest.mark.parametrize(
    ("cores", "local", "busy", "expected"),
    [(2, 1, 0.0, 2), (2, 1, 0.4, 2), (2, 1, 1.0, 1), (2, 1, 3.0, 1), (16, 1, 0.0, 16),
     (16, 8, 0.0, 2), (64, 8, 0.0, 8), (64, 8, 16.2, 6), (1, 4, 0.0, 1)],
)  # fmt: skip
def test_auto_shares_the_free_cores_between_the_training_processes(
    cores, local, busy, expected, monkeypatch
):
    monkeypatch.setattr(threads_module, "physical_cores", lambda n: n)
    threads, why = choose_threads(cores, local, busy=lambda: busy)
    assert threads == expected and why.startswith("auto")


def test_data_workers_do_not_take_threads_from_the_step():
    """The policy before: (cores − workers·processes) // processes gave 1 thread on 2 cores with
    1 worker, 1.38× the time of 2 threads on the digits run (RESULTS.md "End to end")."""
    assert choose_threads(2, 1, busy=idle)[0] == min(2, threads_module.physical_cores(2))


def test_hyper_threads_count_as_their_physical_core(monkeypatch):
    monkeypatch.setattr(
        threads_module.psutil, "cpu_count", lambda logical=True: 32 if logical else 16
    )
    assert choose_threads(32, 1, busy=idle)[0] == 16
    assert choose_threads(8, 1, busy=idle)[0] == 4


def test_the_config_then_omp_num_threads_win():
    def never() -> float:
        raise AssertionError("measured although the thread count was given")

    assert choose_threads(16, 1, configured=3, env="5", busy=never) == (3, "train.threads=3")
    assert choose_threads(16, 1, env="5", busy=never) == (5, "OMP_NUM_THREADS=5")
    assert choose_threads(16, 1, env="", busy=idle)[0] >= 1  # empty: not set


def test_a_busy_core_is_measured_and_this_process_is_not():
    """A spinning child keeps one core busy: it is measured (this process sleeps meanwhile)."""
    if not hasattr(os, "sched_getaffinity") or available_cores() < 2:
        pytest.skip("needs Linux and 2 cores")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_elsewhere(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy >= 0.7
    assert choose_threads(available_cores(), 1, busy=lambda: busy)[0] <= available_cores() - 1


def test_set_threads_applies_and_logs(caplog, monkeypatch):
    monkeypatch.setattr(threads_module, "busy_elsewhere", idle)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            threads = set_threads(0, environ={"LOCAL_WORLD_SIZE": "1"})
        assert (
            threads == threads_module.physical_cores(available_cores()) == torch.get_num_threads()
        )
        (line,) = [r.getMessage() for r in caplog.records if "intra-op threads" in r.getMessage()]
        assert f"threads per process: {threads} (auto: {available_cores()} cores, 0.0 busy" in line
    finally:
        torch.set_num_threads(before)
