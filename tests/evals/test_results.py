"""Tests for evals.results: CLIP_benchmark-shaped JSON, NaN handling and atomic writes."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from evals.results import read_result, result_filename, write_result
from vlp import atomic_files

FIELDS = {
    "dataset": "wds/vtab/cifar10",
    "model": "ViT-B-32",
    "pretrained": "laion400m_e32",
    "task": "zeroshot_classification",
}


def test_round_trip_has_clip_benchmark_shape(tmp_path) -> None:
    metrics = {"acc1": 0.5, "acc5": float("nan"), "mean_per_class_recall": np.float32(0.25)}
    path = write_result(tmp_path / "sub" / "r.json", metrics=metrics, **FIELDS)
    assert path == tmp_path / "sub" / "r.json"
    raw = json.loads(path.read_text())
    assert list(raw) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert raw["language"] == "en"
    record = read_result(path)
    assert record["metrics"]["acc1"] == 0.5
    assert type(record["metrics"]["mean_per_class_recall"]) is float
    assert math.isnan(record["metrics"]["acc5"])
    assert {k: record[k] for k in FIELDS} == FIELDS  # type: ignore[literal-required]


def test_nan_is_written_like_json_dump_default(tmp_path) -> None:
    metrics = {"acc1": 1.0, "acc5": float("nan")}
    path = write_result(tmp_path / "r.json", metrics=metrics, **FIELDS)
    assert '"acc5": NaN' in path.read_text()  # what CLIP_benchmark's json.dump writes
    assert json.dumps({"acc5": float("nan")}) == '{"acc5": NaN}'

    def strict(token: str) -> float:
        raise ValueError(f"non-standard JSON constant {token}")

    with pytest.raises(ValueError, match="NaN"):  # not strict RFC 8259 JSON, as documented
        json.loads(path.read_text(), parse_constant=strict)


def test_metrics_are_coerced_or_rejected(tmp_path) -> None:
    path = write_result(
        tmp_path / "r.json", metrics={"a": torch.tensor(0.5), "n": 3, "b": np.float64(2)}, **FIELDS
    )
    assert read_result(path)["metrics"] == {"a": 0.5, "n": 3, "b": 2.0}
    with pytest.raises(TypeError, match="'bad'"):
        write_result(tmp_path / "x.json", metrics={"bad": "high"}, **FIELDS)
    assert not (tmp_path / "x.json").exists()


def test_write_is_atomic(tmp_path, monkeypatch) -> None:
    path = write_result(tmp_path / "r.json", metrics={"acc1": 0.1}, **FIELDS)
    write_result(path, metrics={"acc1": 0.2}, **FIELDS)  # replaces an existing file
    assert read_result(path)["metrics"]["acc1"] == 0.2

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(atomic_files, "fsync_path", crash)  # the temporary is written by then
    with pytest.raises(RuntimeError, match="mid-write"):
        write_result(path, metrics={"acc1": 0.3}, **FIELDS)
    assert read_result(path)["metrics"]["acc1"] == 0.2  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_get_the_umask_permissions(tmp_path, umask, mode) -> None:
    """Like a plain open(): before, mkstemp made every result 0600, unreadable to teammates."""
    previous = os.umask(umask)
    try:
        path = write_result(tmp_path / "r.json", metrics={"acc1": 0.1}, **FIELDS)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_read_rejects_other_json(tmp_path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"dataset": "x", "metrics": {}}))
    with pytest.raises(ValueError, match=r"other\.json.*missing keys \['model'"):
        read_result(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_result(path)


def test_result_filename_follows_clip_benchmark(tmp_path) -> None:
    name = result_filename(**FIELDS)
    assert name == "vtab_cifar10_laion400m_e32_ViT-B-32_en_zeroshot_classification.json"
    checkpoint = tmp_path / "epoch_32.pt"
    checkpoint.write_bytes(b"")
    fields = {**FIELDS, "pretrained": str(checkpoint), "language": "fr"}
    assert result_filename(**fields).startswith("vtab_cifar10_epoch_32.pt_ViT-B-32_fr_")


def test_package_import_is_light() -> None:
    code = (
        "import sys, evals; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_result_filename_flattens_paths_in_model_and_pretrained() -> None:
    name = result_filename(
        dataset="wds/shapes",
        model="local-dir:/exports/tiny",
        pretrained="runs/demo/checkpoints/step_00000600",
        task="zeroshot_classification",
    )
    assert "/" not in name and ":" not in name
    assert name == (
        "shapes_runs_demo_checkpoints_step_00000600_local-dir__exports_tiny_en_"
        "zeroshot_classification.json"
    )


def test_extra_keys_follow_clip_benchmarks(tmp_path) -> None:
    path = write_result(
        tmp_path / "r.json", **FIELDS, metrics={"acc1": 0.5}, images_skipped=2, images_evaluated=8
    )
    record = read_result(path)
    assert list(record)[:6] == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert record["images_skipped"] == 2 and record["images_evaluated"] == 8
