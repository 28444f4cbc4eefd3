"""``benchmarks/max_exact_batch.py --cpu``: the GPU benchmark's whole path at smoke size (the
plain-loss check, a GradCache step with the tiled loss at each batch, the table and its JSON), so
that the GPU run has nothing left to debug."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import max_exact_batch  # noqa: E402


def test_cpu_mode_checks_the_exact_loss_and_times_a_step_at_every_batch(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = max_exact_batch.main(["--cpu", "--batches", "32", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    reference = result["reference"]
    assert reference["micro_batches"] == 4 and reference["tile"] < reference["batch"]
    assert reference["loss_rel_diff"] < max_exact_batch.CPU_TOLERANCE["loss"]
    assert reference["grad_max_rel_diff"] < max_exact_batch.CPU_TOLERANCE["grad"]
    assert [row["batch"] for row in result["rows"]] == [32, 64]
    for row in result["rows"]:
        assert row["status"] == "ok" and row["micro_batches"] == row["batch"] // 16
        assert row["step_s"] > 0 and row["samples_per_s"] > 0 and row["loss"] > 0
    assert result["largest_exact_batch"] == 64
    assert "global batch | micro-batches | step s" in capsys.readouterr().out


def test_a_micro_batch_is_the_same_tensors_each_time_it_is_read() -> None:
    chunks = max_exact_batch.SyntheticChunks(12, 4, 8, 5, 100, torch.device("cpu"), seed=3)
    assert len(chunks) == 3 and len(list(chunks)) == 3
    first, again = chunks[1], chunks[1]
    assert all(torch.equal(first[k], again[k]) for k in ("image", "text"))
    assert not torch.equal(chunks[0]["image"], first["image"])
    assert chunks.whole()["text"].shape == (12, 5) and int(first["text"].min()) >= 1


def test_the_time_guard_grows_the_encodings_linearly_and_the_loss_quadratically() -> None:
    row = {"batch": 100, "cache_s": 4.0, "replay_s": 3.0, "optimizer_s": 0.5}
    # encode 1 s (a third of the replay), loss 3 s: (3 + 1) x 2 + 3 x 4 + 0.5
    assert max_exact_batch.predicted_step_s(row, 200) == 20.5
