"""Shared test setup: no test may reach the network (no HF hub, no open_clip downloads), and in
CI a test that skips because a dependency does not import is a failure, not a quiet skip."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _own_vlp_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """vlp's cache (the tiny BERT, ``vlp:tiny-bert``) in the session's temp folder, for this
    process and the ones it starts: tests never touch ``~/.cache/vlp``."""
    os.environ["VLP_CACHE_DIR"] = str(tmp_path_factory.mktemp("vlp-cache"))


pytest_plugins = ["pytester"]

# ``pytest.importorskip``'s reason starts with this; every dev dependency is in requirements.txt
MISSING_IMPORT = "could not import"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _fail_missing_import_in_ci(report: Any) -> None:
    if not (_in_ci() and report.skipped and isinstance(report.longrepr, tuple)):
        return
    reason = str(report.longrepr[2])
    if MISSING_IMPORT in reason:
        report.outcome = "failed"
        report.longrepr = f"CI=true: a dev dependency is missing, so this cannot skip. {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[Any]:
    outcome = yield
    _fail_missing_import_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[Any]:
    outcome = yield
    _fail_missing_import_in_ci(outcome.get_result())


def _cost(item: pytest.Item) -> int:
    """0: runs for minutes (``slowest``), 1: seconds (``slow``), 2: quick."""
    return 0 if item.get_closest_marker("slowest") else 1 if item.get_closest_marker("slow") else 2


def _seconds(item: pytest.Item) -> float:
    """A ``slowest`` test's rough duration (``@pytest.mark.slowest(seconds=...)``), else 0."""
    marker = item.get_closest_marker("slowest")
    return float(marker.kwargs.get("seconds", 30)) if marker else 0.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests so that ``pytest -n N --dist worksteal`` (``make test``) keeps its N
    workers busy to the end: worksteal hands worker k the k-th contiguous share of this list
    and later moves tests only from the back of a queue, so the long tests are dealt round-robin
    to the front of every share (the longest first) and quick ones fill the shares up; without
    workers, slow tests simply run first."""
    ranked = sorted(items, key=lambda item: (_cost(item), -_seconds(item)))
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    heavy = [item for item in ranked if _cost(item) < 2]
    light = [item for item in ranked if _cost(item) == 2]
    if workers < 2:
        items[:] = ranked
        return
    ordered: list[pytest.Item] = []
    left = len(items)
    for k in range(workers):
        size = left // (workers - k)  # what worksteal's first distribution sends worker k
        share = heavy[k::workers]
        take = max(size - len(share), 0)
        ordered += share + light[:take]
        light = light[take:]
        left -= size
    items[:] = ordered + light
