"""Soak test: train with random SIGKILLs and `train.resume=latest` restarts for a given time,
each restart on a random number of processes and data workers.

    .venv/bin/python benchmarks/soak.py --minutes 10 --steps 200

The demo's tiny model on synthetic shards on the CPU, global batch 16 (micro-batches of 8, 4
canonical streams), a checkpoint every step. Each restart resumes from the newest complete
checkpoint on 1 or 2 processes (gloo, ``accelerate launch``; ``train.accum_steps`` follows)
with 1 or 2 data workers, and is killed (``kill -9`` of it and every process it started) a
random number of steps later (seeded). When the time is up, or the run has reached
``--steps``, a last restart finishes it, and an uninterrupted run on 1 process with 2
micro-batches is trained for comparison. Reported:

- restarts, and steps lost per restart (steps logged by the killed process past the checkpoint
  it is resumed from: work done twice);
- samples seen twice or never: the stream has no per-sample log, so this compares, for every
  step, the loss logged last (the one the final model descends from) with the uninterrupted
  run's loss at that step (within 1e-5: another layout sums in another order), and the final
  data positions of every canonical stream with the uninterrupted run's; equal losses at every
  step and equal positions mean every step saw the same samples;
- how far the final model and optimizer state are from the uninterrupted run's (0 when no
  restart changed the layout; float32 round-off otherwise).

Prints a table and writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.stream import merge_states  # noqa: E402
from data_pipelines.synthetic import generate_samples  # noqa: E402
from data_pipelines.write import write_shards  # noqa: E402
from vlp import run_folder  # noqa: E402

DEMO = ROOT / "launch" / "configs" / "demo.yaml"
ACCELERATE_2PROC = ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"


def command(
    shards: Path, out: Path, steps: int, resume: bool, processes: int = 1, workers: int = 1
) -> list[str]:
    """`launch/pretrain.py` with tiny settings, global batch 16 and a checkpoint every step,
    on ``processes`` processes (``accelerate launch`` for 2) with ``workers`` data workers."""
    values = {
        "data.train_shards": shards, "data.batch_size": 8, "data.workers": workers,
        "data.streams": 4, "data.shuffle_buffer": 16, "train.out_dir": out,
        "train.steps": steps, "train.accum_steps": 2 // processes, "train.log_every": 1,
        "train.checkpoint_every": 1, "train.report_to": "[]", "optim.warmup_steps": 1,
        **({"train.resume": "latest"} if resume else {}),
    }  # fmt: skip
    overrides = [f"{k}={v}" for k, v in values.items()]
    script = [str(ROOT / "launch/pretrain.py"), "--config", str(DEMO), *overrides]
    if processes == 1:
        return [sys.executable, *script]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    with socket.socket() as free:  # a port of its own: a killed run's may still be held
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    return [*launch, str(ACCELERATE_2PROC), "--main_process_port", port, *script]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def newest_step(out: Path) -> int:
    found = run_folder.list_checkpoints(run_folder.checkpoints_dir(out))
    return run_folder.step_of(found[-1]) if found else 0


def run_to_end(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")


def kill_after(cmd: list[str], out: Path, extra_steps: int) -> tuple[int, int] | None:
    """Start ``cmd``; SIGKILL it once it has logged ``extra_steps`` more steps than its start.

    Returns (step resumed from, last step logged before the kill), or None if it finished.
    """
    start = newest_step(out)
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    while True:
        records = logged(out)
        last = max((r["step"] for r in records if "train/loss" in r), default=0)
        if last >= start + extra_steps:
            kill_all(process.pid)
            process.wait()
            last = max((r["step"] for r in logged(out) if "train/loss" in r), default=0)
            return start, last
        if process.poll() is not None:
            return None
        time.sleep(0.02)


def kill_all(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun's ranks leave its process group)."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs(family, timeout=60)


def final_state(out: Path, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The final checkpoint's model and optimizer tensors, and every stream's data position."""
    final = run_folder.checkpoints_dir(out) / run_folder.checkpoint_name(steps)
    tensors = {
        f"{part}/{key}": value
        for part in ("model", "optimizer")
        for key, value in load_file(str(final / f"{part}.safetensors")).items()
    }
    states = [json.loads(f.read_text()) for f in sorted(final.glob("data_rank*.json"))]
    return tensors, merge_states(states)["positions"]


def losses_by_step(records: list[dict]) -> dict[int, float]:
    """The loss logged LAST for each step (a later restart's value replaces a killed one's)."""
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak time (default 10)")
    parser.add_argument("--steps", type=int, default=200, help="train.steps of the run")
    parser.add_argument("--max-steps-between-kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="vlp-soak-") as scratch:
        work = Path(scratch)
        shards = work / "shards"
        write_shards(generate_samples(128, seed=0), shards, samples_per_shard=32)
        soak, whole = work / "soak", work / "whole"
        deadline = time.time() + 60 * args.minutes
        restarts: list[dict[str, int]] = []
        while time.time() < deadline:
            extra = rng.randint(1, args.max_steps_between_kills)
            processes, workers = rng.choice((1, 2)), rng.choice((1, 2))
            run = command(shards, soak, args.steps, True, processes, workers)
            done = kill_after(run, soak, extra)
            if done is None:
                break
            resumed_from, last = done
            restarts.append(
                {
                    "processes": processes,
                    "workers": workers,
                    "resumed_from": resumed_from,
                    "killed_after_step": last,
                    "checkpoint_after_kill": newest_step(soak),
                }
            )
        run_to_end(command(shards, soak, args.steps, True, *rng.choice(((1, 1), (2, 2)))))
        run_to_end(command(shards, whole, args.steps, resume=False))
        lost = [
            r["killed_after_step"] - r["checkpoint_after_kill"] for r in restarts
        ]  # steps redone by the next restart
        got, expected = losses_by_step(logged(soak)), losses_by_step(logged(whole))
        differing = [
            s for s in expected if s not in got or abs(got[s] - expected[s]) > 1e-5 * expected[s]
        ]
        (tensors, positions), (whole_tensors, whole_positions) = (
            final_state(soak, args.steps),
            final_state(whole, args.steps),
        )

        def farthest(part: str) -> float:
            keys = [k for k in whole_tensors if k.startswith(part)]
            return max(float((tensors[k] - whole_tensors[k]).abs().max()) for k in keys)

        report = {
            "minutes": args.minutes,
            "steps": args.steps,
            "seed": args.seed,
            "restarts": len(restarts),
            "steps_lost_per_restart": {
                "mean": sum(lost) / len(lost) if lost else 0.0,
                "max": max(lost, default=0),
            },
            "layouts": sorted({f"{r['processes']}x{r['workers']}" for r in restarts}),
            "steps_with_another_batch": len(differing),
            "final_data_positions_equal": positions == whole_positions,
            "samples_twice_or_never": "none"
            if not differing and positions == whole_positions
            else "some",
            "final_model_max_abs_diff": farthest("model/"),
            "final_optimizer_max_abs_diff": farthest("optimizer/"),
            "kills": restarts,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    rows = [(k, v) for k, v in report.items() if k != "kills"]
    width = max(len(k) for k, _ in rows)
    print(f"\nsoak: {args.minutes} min, kill -9 every 1..{args.max_steps_between_kills} steps")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
