"""What the terminal shows: log lines a file can hold, one line per user error, no false alarms."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.cli import main
from tests.launch.test_pretrain import DEMO, ROOT, _env, _free_port, _overrides


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(generate_samples(64, seed=0), out, samples_per_shard=32)
    return out


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_piped_training_log_is_whole_lines_with_eta(shards, tmp_path):
    """Not a TTY: no progress-bar frames (``\\r``) glued onto log lines; each periodic line has
    step, losses, samples/s and ETA; warmup longer than the run is pointed out; the last line
    says where the run's files are."""
    overrides = _overrides(shards, tmp_path / "run", **{"train.steps": 3, "optim.warmup_steps": 5})
    command = [sys.executable, str(ROOT / "launch/pretrain.py"), "--config", str(DEMO), *overrides]
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "\r" not in output
    step_lines = [line for line in output.splitlines() if " vlp.training.loop: step " in line]
    assert len(step_lines) == 3, output[-3000:]
    for n, line in enumerate(step_lines, start=1):
        assert re.search(
            rf"INFO vlp\.training\.loop: step {n}/3 train/contrastive_loss=\S+ .*"
            r"train/loss=\S+ train/lr=\S+ train/samples_per_s=\S+ eta=\d+s$",
            line,
        ), line
    assert "optim.warmup_steps=5 is more than train.steps=3" in output
    run = tmp_path / "run"
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert re.search(
        rf"finished at step 3: 24 samples seen, [\d.]+ min in this run; last checkpoint "
        rf"{run}/checkpoints/step_00000003; metrics in {run}/metrics.jsonl, plots in {run}/plots",
        last,
    ), output[-3000:]
    assert "initialized randomly" not in output


@pytest.mark.slow
def test_config_error_under_accelerate_launch_is_printed_once(tmp_path):
    """Every rank meets the error; the first to fail alone prints it, named by rank, and its
    exit status (2) and the message are the root cause that ends the launcher's summary.
    torchrun's own ChildFailedError traceback is the launcher's: it follows any non-zero worker
    exit and no worker can silence it."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "launch/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        str(ROOT / "launch/pretrain.py"), "--config", str(DEMO), "train.stepz=3",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    printed = [line for line in output.splitlines() if line.startswith("vlp: error:")]
    assert len(printed) == 1 and "unknown config key 'train.stepz'" in printed[0], output
    root_cause = output[output.index("Root Cause") :]
    rank = re.fullmatch(r"vlp: error: rank ([01]) of 2: .*", printed[0])
    assert rank, printed
    assert re.search(
        rf"rank\s+: {rank[1]} \(local_rank: {rank[1]}\)\n\s+exitcode\s+: 2 ", root_cause
    ), output
    assert f"traceback : {printed[0]}" in root_cause, output
    assert "launch/cli.py" not in output  # no traceback from a worker


def test_bad_pretrained_is_reported_under_model_pretrained(shards, tmp_path, capsys):
    args = ["train", "--check", "--config", str(DEMO), *_overrides(shards, tmp_path)]
    assert main([*args, "model.pretrained=laion2b_s34b_b79k"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("vlp: error: model.pretrained='laion2b_s34b_b79k': "), line
    assert "not a pretrained tag" in line or "neither a weights file" in line, line


def test_resume_with_another_batch_size_is_one_line(shards, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", "--config", str(DEMO), *_overrides(shards, out, **{"train.steps": 1})]
    assert main(train) == 0
    capsys.readouterr()
    assert main([*train, "train.steps=2", "train.resume=latest", "data.batch_size=4"]) == 2
    line = _one_error_line(capsys)
    assert "train.resume: checkpoint" in line and "global batch 8; this run has 4" in line, line
    assert main([*train, "train.resume=/no/ckpt"]) == 2
    assert "train.resume='/no/ckpt' is not a complete checkpoint" in _one_error_line(capsys)
