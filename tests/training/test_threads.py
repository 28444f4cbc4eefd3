"""Intra-op threads come from the cores this process may use, not from every core of the box."""

import logging

import pytest
import torch

from vlp.training.threads import available_cores, choose_threads, set_threads


@pytest.mark.parametrize(
    ("cores", "local", "workers", "expected"),
    [(2, 1, 1, 1), (2, 1, 2, 1), (16, 1, 2, 14), (16, 8, 1, 1), (64, 8, 2, 6), (1, 4, 4, 1)],
)
def test_auto_splits_the_cores_left_by_the_workers(cores, local, workers, expected):
    threads, why = choose_threads(cores, local, workers)
    assert threads == expected and why.startswith("auto")


def test_the_config_then_omp_num_threads_win():
    assert choose_threads(16, 1, 2, configured=3, env="5") == (3, "train.threads=3")
    assert choose_threads(16, 1, 2, env="5") == (5, "OMP_NUM_THREADS=5")
    assert choose_threads(16, 1, 2, env="")[0] == 14  # empty: not set


def test_set_threads_applies_and_logs(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            threads = set_threads(0, workers=0, environ={"LOCAL_WORLD_SIZE": "1"})
        assert threads == available_cores() == torch.get_num_threads()
        (line,) = [r.getMessage() for r in caplog.records if "intra-op threads" in r.getMessage()]
        assert f"threads per process: {threads} (auto: {threads} cores" in line
    finally:
        torch.set_num_threads(before)
