"""Soak test: train with random SIGKILLs and `train.resume=latest` restarts for a given time.

    .venv/bin/python benchmarks/soak.py --minutes 10 --steps 200

One process on the CPU, the demo's tiny model on synthetic shards, a checkpoint every step.
Each restart resumes from the newest complete checkpoint and is killed (``kill -9`` of its
process group) a random number of steps later (seeded). When the time is up, or the run has
reached ``--steps``, a last restart finishes it, and an uninterrupted run of the same config is
trained for comparison. Reported:

- restarts, and steps lost per restart (steps logged by the killed process past the checkpoint
  it is resumed from: work done twice);
- samples seen twice or never: the stream has no per-sample log, so this compares, for every
  step, the loss logged last (the one the final model descends from) with the uninterrupted
  run's loss at that step, and the final data position (``data_rank0.json``) with the
  uninterrupted run's; an equal loss at every step and an equal position mean every step saw
  the same batch, so no sample was seen twice or skipped;
- whether the final model and optimizer state equal the uninterrupted run's, bit for bit.

Prints a table and writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.synthetic import generate_samples  # noqa: E402
from data_pipelines.write import write_shards  # noqa: E402
from vlp import run_folder  # noqa: E402

DEMO = ROOT / "launch" / "configs" / "demo.yaml"
FINAL_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "data_rank0.json")


def command(shards: Path, out: Path, steps: int, resume: bool) -> list[str]:
    """`launch/pretrain.py` with tiny settings and a checkpoint every step."""
    values = {
        "data.train_shards": shards, "data.batch_size": 8, "data.workers": 0,
        "data.shuffle_buffer": 16, "train.out_dir": out, "train.steps": steps,
        "train.log_every": 1, "train.checkpoint_every": 1, "train.report_to": "[]",
        "optim.warmup_steps": 1, **({"train.resume": "latest"} if resume else {}),
    }  # fmt: skip
    overrides = [f"{k}={v}" for k, v in values.items()]
    return [sys.executable, str(ROOT / "launch/pretrain.py"), "--config", str(DEMO), *overrides]


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
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            last = max((r["step"] for r in logged(out) if "train/loss" in r), default=0)
            return start, last
        if process.poll() is not None:
            return None
        time.sleep(0.02)


def final_files(out: Path, steps: int) -> dict[str, bytes]:
    final = run_folder.checkpoints_dir(out) / run_folder.checkpoint_name(steps)
    return {name: (final / name).read_bytes() for name in FINAL_FILES}


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
            done = kill_after(command(shards, soak, args.steps, resume=True), soak, extra)
            if done is None:
                break
            resumed_from, last = done
            restarts.append(
                {
                    "resumed_from": resumed_from,
                    "killed_after_step": last,
                    "checkpoint_after_kill": newest_step(soak),
                }
            )
        run_to_end(command(shards, soak, args.steps, resume=True))
        run_to_end(command(shards, whole, args.steps, resume=False))
        lost = [
            r["killed_after_step"] - r["checkpoint_after_kill"] for r in restarts
        ]  # steps redone by the next restart
        got, expected = losses_by_step(logged(soak)), losses_by_step(logged(whole))
        differing = [s for s in expected if got.get(s) != expected[s]]
        a, b = final_files(soak, args.steps), final_files(whole, args.steps)
        report = {
            "minutes": args.minutes,
            "steps": args.steps,
            "seed": args.seed,
            "restarts": len(restarts),
            "steps_lost_per_restart": {
                "mean": sum(lost) / len(lost) if lost else 0.0,
                "max": max(lost, default=0),
            },
            "steps_with_another_batch": len(differing),
            "final_data_position_equal": a["data_rank0.json"] == b["data_rank0.json"],
            "samples_twice_or_never": "none"
            if not differing and a["data_rank0.json"] == b["data_rank0.json"]
            else "some",
            "final_model_bitwise_equal": a["model.safetensors"] == b["model.safetensors"],
            "final_optimizer_bitwise_equal": (
                a["optimizer.safetensors"] == b["optimizer.safetensors"]
                and a["optimizer.json"] == b["optimizer.json"]
            ),
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
