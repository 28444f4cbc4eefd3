"""`vlp watch` on synthetic run folders (metrics.jsonl, config.yaml, data skips; no training)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals.results import write_result
from launch.cli import main
from launch.watch import CLEAR, NotARunError, read_run, sparkline, watch


def write_run(run_dir: Path, steps: int, logged: list[int], evals_at: int | None = None) -> Path:
    """A run folder as the trainer leaves it after logging ``logged`` steps of ``steps``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        f"model:\n  name: vlp-tiny-vit\ntrain:\n  steps: {steps}\n"
    )
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in logged:
            row = {"step": step, "train/clip_loss": 4.0 / step, "train/loss": 4.0 / step,
                   "train/lr": 5e-4 * step / steps, "train/samples_per_s": 812.5}  # fmt: skip
            if step == evals_at:
                row |= {"eval/heldout/acc1": 0.8125, "eval/heldout/acc5": 0.96875}
            f.write(json.dumps(row) + "\n")
    return run_dir


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_once_prints_losses_lr_speed_skips_and_eval(tmp_path) -> None:
    run_dir = write_run(tmp_path / "run", steps=100, logged=[10, 20, 30, 40], evals_at=20)
    for rank, (ok, skipped, shards) in enumerate([(300, 2, {"a.tar": 2}), (298, 1, {"b.tar": 1})]):
        (run_dir / f"data_skips_rank{rank}.json").write_text(
            json.dumps({"ok": ok, "skipped": skipped, "by_shard": shards, "reasons": {}})
        )
    out = io.StringIO()
    assert watch(run_dir, once=True, out=out) == 0
    text = out.getvalue()
    assert "step 40 / 100 (40%)" in text and "[running" in text
    assert "  loss " in text and "0.1 " in text and "(first 0.4)" in text  # 4/40, 4/10
    assert "clip_loss" in text and "2.000e-04" in text and "812.5" in text  # lr, samples/s
    assert "3 of 601 samples (0.50%) in 2 shards" in text
    assert "eval at step 20" in text and "heldout/acc1" in text and "0.8125" in text
    assert CLEAR not in text and text.endswith("\n\n")


def test_an_eval_line_after_the_last_step_keeps_the_training_rows(tmp_path) -> None:
    """A finished demo's last line is its eval (``{"step": N, "eval/...": ...}``)."""
    run_dir = write_run(tmp_path / "run", steps=40, logged=[10, 20, 30, 40])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 40, "eval/heldout/acc1": 0.75}) + "\n")
    out = io.StringIO()
    watch(run_dir, once=True, out=out)
    text = out.getvalue()
    assert "  loss " in text and "(first 0.4)" in text and "812.5" in text, text
    assert "eval at step 40" in text and "0.75" in text


def test_refreshes_until_the_run_finishes(tmp_path) -> None:
    run_dir = write_run(tmp_path / "run", steps=30, logged=[10])
    sleeps: list[float] = []

    def training_goes_on(seconds: float) -> None:  # each wait, the trainer logs 10 more steps
        sleeps.append(seconds)
        write_run(run_dir, steps=30, logged=list(range(10, 10 * (len(sleeps) + 2), 10)))

    out = FakeTty()
    assert watch(run_dir, interval=2.5, out=out, sleep=training_goes_on) == 0
    text = out.getvalue()
    assert sleeps == [2.5, 2.5] and text.count(CLEAR) == 3  # steps 10, 20, 30: redrawn
    assert "finished: 30 steps" in text.split(CLEAR)[-1] and "[finished]" in text


def test_eval_falls_back_to_results_json(tmp_path) -> None:
    run_dir = write_run(tmp_path / "run", steps=100, logged=[10, 20])
    for step, acc in ((10, 0.25), (20, 0.5)):
        write_result(run_dir / "results" / f"heldout_{step}.json", dataset="heldout",
                     model="vlp-tiny-vit", pretrained=f"step_{step}",
                     task="zeroshot_classification", metrics={"acc1": acc})  # fmt: skip
    state = read_run(run_dir)
    assert state.eval_step == 20 and state.evals == {"heldout/acc1": 0.5}


def test_half_written_last_line_is_ignored(tmp_path) -> None:
    run_dir = write_run(tmp_path / "run", steps=100, logged=[10, 20])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "train/lo')
    state = read_run(run_dir)
    assert state.step == 20 and not state.finished


def test_a_started_run_without_metrics(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text("train:\n  steps: 5\n")
    out = io.StringIO()
    assert watch(tmp_path, once=True, out=out) == 0
    assert "no step logged yet" in out.getvalue() and "data skips  none recorded" in out.getvalue()


def test_sparkline_spans_low_to_high() -> None:
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▁▁" and sparkline([]) == ""


def test_cli_once_and_not_a_run(tmp_path, capsys) -> None:
    run_dir = write_run(tmp_path / "run", steps=40, logged=[10, 20, 30, 40])
    assert main(["watch", str(run_dir)]) == 0  # finished: no --once needed
    assert "finished: 40 steps" in capsys.readouterr().out
    assert main(["watch", str(tmp_path / "run"), "--once", "--interval", "1"]) == 0
    assert main(["watch", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlp: error: ") and "is not a vlp run directory" in error
    assert "\n" not in error
    with pytest.raises(NotARunError, match="no config.yaml or metrics.jsonl"):
        read_run(tmp_path / "missing")


def test_watch_does_not_import_torch(tmp_path) -> None:
    run_dir = write_run(tmp_path / "run", steps=10, logged=[10])
    code = (
        "import sys; from launch.watch import watch; watch(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, capture_output=True)
