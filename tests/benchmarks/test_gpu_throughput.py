"""``benchmarks/gpu_throughput.py --cpu``: the GPU benchmark's whole path at smoke size (shards
written, vlp's run and its fast paths timed, the table and its JSON), so that the GPU run has
nothing left to debug. The sides run in the test's process; open_clip_train's side runs where it
imports (its own environment, ``make bench-peer``), else the JSON says why it was skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_throughput  # noqa: E402


@pytest.mark.slow  # 8 s alone on 2 busy cores (4 runs, dynamo capture included)
def test_cpu_mode_writes_shards_times_every_run_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = [
        "--cpu",
        "--in-process",
        "--workers",
        "0",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    result = gpu_throughput.main([*argv, "--samples", "64", "--per-shard", "32"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    vlp = [row for row in result["rows"] if row["side"] == "vlp"]
    settings = [row["settings"][1:] for row in vlp]
    assert settings == [[], *(s.split() for s in gpu_throughput.CPU_VARIANTS)]
    for row in vlp:
        assert row["samples_per_s"] > 0 and row["ceiling_samples_per_s"] > 0
        assert row["compute_s"] > 0 and 0 <= row["data_wait_fraction"] < 1
        assert row["forward_flops_per_sample"] > 0
    flops = {" ".join(row["settings"]): row["forward_flops_per_sample"] for row in vlp}
    assert flops["optim.grad_clip=null model.patch_dropout=0.5"] < flops["optim.grad_clip=null"]
    peer = [row for row in result["rows"] if row["side"] == "open_clip"]
    assert peer or "open_clip_train does not import" in result["skipped"][0]
    assert "samples/s | step ms | data ms" in capsys.readouterr().out
