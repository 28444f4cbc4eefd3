"""The rank pool behind ``run_on_ranks``: each call sees the state a fresh process would, and a
failing rank is reported by rank and does not poison the next call."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests.ddp_helpers import run_on_ranks


def _leave_a_mess(rank: int, world: int) -> dict[str, Any]:
    seen = {
        "dtype": str(torch.get_default_dtype()),
        "draw": torch.rand(3),
        "env": os.environ.get("VLP_POOL_TEST", ""),
        "cwd": os.getcwd(),
    }
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234 + rank)
    os.environ["VLP_POOL_TEST"] = "left behind"
    os.chdir("/")
    return seen


def _fail_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 breaks")
    return rank


def test_each_call_sees_a_fresh_process(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("VLP_POOL_TEST", "from the caller")
    monkeypatch.chdir(tmp_path)
    first = run_on_ranks(_leave_a_mess, 2)
    second = run_on_ranks(_leave_a_mess, 2)
    for a, b in zip(first, second, strict=True):
        assert a["dtype"] == b["dtype"] == "torch.float32"
        assert a["env"] == b["env"] == "from the caller"
        assert a["cwd"] == b["cwd"] == str(tmp_path)
        torch.testing.assert_close(a["draw"], b["draw"], rtol=0, atol=0)


def test_a_failing_rank_is_named_and_the_next_call_works() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 raised:(.|\n)*rank 1 breaks"):
        run_on_ranks(_fail_on_rank_1, 2, timeout_s=30)
    assert run_on_ranks(_leave_a_mess, 2)[0]["dtype"] == "torch.float32"
