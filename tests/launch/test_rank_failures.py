"""A failure on one rank only, under `accelerate launch` with 2 gloo processes: the user sees it
once, named by the rank that failed, and the launcher's summary names it too; the peer it
brings down ("Connection closed by peer") stays quiet."""

from __future__ import annotations

import re

import pytest

from tests.launch.test_pretrain import ROOT, _accelerate, _overrides, shards  # noqa: F401

ENTRY = ROOT / "tests" / "launch" / "rank_fault_entry.py"


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, expected",
    [
        ("user", "injected on this rank: 9 of 10 samples skipped, worst shards: x"),
        ("bug", "RuntimeError: injected bug on this rank"),
    ],
)
def test_a_failure_on_rank_1_alone_is_printed_once_and_named_by_rank(
    shards,  # noqa: F811
    tmp_path,
    fault,
    expected,
):
    overrides = _overrides(shards, tmp_path / "run", **{"train.steps": 3})
    done = _accelerate(overrides, entry=ENTRY, env={"VLP_TEST_FAULT": fault,
                                                    "VLP_TEST_FAULT_RANK": "1"})  # fmt: skip
    assert done.returncode != 0, done.stderr[-3000:]
    printed = [line for line in done.stderr.splitlines() if line.startswith("vlp: error")]
    assert len(printed) == 1, done.stderr[-3000:]
    assert printed[0].startswith(f"vlp: error: rank 1 of 2: {expected}"), printed
    assert "Connection closed" not in done.stderr, done.stderr[-3000:]
    if fault == "bug":  # the traceback of rank 1, printed once, above the line
        assert done.stderr.count("in failing_step") == 2, done.stderr[-3000:]  # + the summary's
    summary = done.stderr[done.stderr.index("Root Cause") :]
    assert re.search(r"rank\s*: 1 ", summary) and expected in summary, summary
