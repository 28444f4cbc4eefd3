"""`kill -9` of a training run at a random (seeded) step, or Ctrl-C, then `train.resume=latest`
to the end: the final weights and optimizer state equal those of an uninterrupted run bit for
bit (CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from tests.launch.test_pretrain import DEMO, ROOT, _env, _free_port, _on_two_ranks, _overrides
from tests.seeds import extra_seeds

STEPS = 6
FINAL_ONLY = {"train.checkpoint_every": 0}
"""For the runs that are not killed: the final checkpoint alone (each one is ~96 MB to write)."""
ACCELERATE_2PROC = ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(generate_samples(64, seed=0), out, samples_per_shard=16)
    return out


def _settings(shards: Path, out: Path, **extra: object) -> list[str]:
    settings = {"train.steps": STEPS, "train.checkpoint_every": 1, "train.report_to": "[]"}
    return _overrides(shards, out, **(settings | extra))


def _command(shards: Path, out: Path, processes: int, **extra: object) -> list[str]:
    args = [
        str(ROOT / "launch/pretrain.py"),
        "--config",
        str(DEMO),
        *_settings(shards, out, **extra),
    ]
    if processes == 1:
        return [sys.executable, *args]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ACCELERATE_2PROC), "--main_process_port", str(_free_port()), *args,
    ]  # fmt: skip


def _run(command: list[str]) -> None:
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _kill_at(command: list[str], out: Path, step: int) -> int:
    """Start ``command`` and SIGKILL it and every process it started once ``step`` is logged."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while _logged_step(out) < step:
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else ""
        assert time.time() < deadline, "the run did not reach the step to kill it at"
        time.sleep(0.02)
    workers = _descendants(process.pid)  # torchrun's workers: not in its process group
    for pid in [process.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    return _logged_step(out)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _final(out: Path) -> dict[str, bytes]:
    final = out / "checkpoints" / f"step_{STEPS:08d}"
    return {
        name: (final / name).read_bytes()
        for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json")
    }


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> dict[tuple[int, int], dict[str, bytes]]:
    """Final checkpoint files of uninterrupted runs, by (processes, data workers per process),
    each run on demand; 2 processes run on the kept gloo ranks (no data worker there), as
    under ``accelerate launch`` without starting it: the killed runs are launched."""

    class Runs(dict[tuple[int, int], dict[str, bytes]]):
        def __missing__(self, key: tuple[int, int]) -> dict[str, bytes]:
            processes, workers = key
            out = tmp_path_factory.mktemp(f"whole{processes}")
            settings = {"data.workers": workers, **FINAL_ONLY}
            if processes == 2 and workers == 0:
                _on_two_ranks(_settings(shards, out, **settings))
            else:
                _run(_command(shards, out, processes, **settings))
            self[key] = _final(out)
            return self[key]

    return Runs()


@pytest.mark.slowest(seconds=50)
@pytest.mark.parametrize(
    "processes, seed",
    [*((1, seed) for seed in extra_seeds(0, 1)), pytest.param(2, 0, id="2proc-accelerate-0")],
)
def test_kill_9_then_resume_latest_equals_an_uninterrupted_run(
    shards, tmp_path, uninterrupted, processes, seed
):
    step = random.Random(seed).randint(1, STEPS - 2)
    out = tmp_path / "run"
    reached = _kill_at(_command(shards, out, processes), out, step)
    assert reached < STEPS, "the run finished before the kill"
    _run(_command(shards, out, processes, **{"train.resume": "latest", **FINAL_ONLY}))
    assert "resumed from" in (out / "train.log").read_text()
    got, expected = _final(out), uninterrupted[processes, 0]
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after kill -9 at step {reached}"


@pytest.mark.slowest(seconds=40)
def test_ctrl_c_checkpoints_then_resume_latest_equals_an_uninterrupted_run(
    shards, tmp_path, uninterrupted
):
    """Ctrl-C as a terminal sends it, to the whole process group (the data worker included):
    the step finishes, the only checkpoint is written then (none is scheduled), the run exits
    130 naming the resume; resuming from that checkpoint ends where an uninterrupted run does."""
    out = tmp_path / "run"
    command = _command(shards, out, 1, **{"train.checkpoint_every": 0, "data.workers": 1})
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while _logged_step(out) < 2:
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else ""
        assert time.time() < deadline, "the run did not reach step 2"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "SIGINT: checkpoint written at step" in stderr and "train.resume=latest" in stderr
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert STEPS > int(checkpoint.name.removeprefix("step_")) >= 2
    _run(command + ["train.resume=latest"])
    got, expected = _final(out), uninterrupted[1, 1]
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after Ctrl-C at {checkpoint.name}"
