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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (stable order otherwise): under ``pytest -n 2`` (``make test``) the
    minutes-long ones then start at once on both workers, and the many quick tests fill the
    end, instead of one long test running alone after everything else has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
