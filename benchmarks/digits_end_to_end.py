"""End to end on a real image dataset: ``vlp train`` against ``open_clip_train`` on the same
shards, time and zero-shot accuracy over seeds.

The dataset is scikit-learn's digits (1,797 8×8 scans that ship inside the package), written as
class folders (``zero`` … ``nine``; every 5th image of a class held out) and turned into shards
by ``vlp shards write`` (PNG, 200 samples a shard, caption "a photo of the digit {c}."). Both
sides then train the same architecture (``--model``, default the demo's tiny ViT) from the same
shards with the same settings: batch 64, ``--steps`` steps (312: ~14 passes over the 1,442
training images), resampled shards, 1 data worker, fp32, AdamW lr 1e-3 / wd 0.1 / betas 0.9,
0.98 / eps 1e-6, 50 warmup steps then cosine, gradient clipping at 1.0 (demo.yaml's), and each
side's own thread policy (no ``OMP_NUM_THREADS``). Time is the wall clock of the whole command,
start-up and final checkpoint included; the runs alternate sides (seed 0: vlp first, seed 1:
open_clip first, ...). Zero-shot is ``vlp eval zeroshot`` on the held-out shards for both
(open_clip's ``epoch_1.pt`` loaded through open_clip's own checkpoint loader), with the training
caption as the template. ``--before-seeds`` adds, for those seeds, vlp with
``train.threads=1``: the thread count of the policy before (cores less one per data worker).
Prints a table and writes ``benchmarks/results/digits_end_to_end.json``.

    .venv/bin/python benchmarks/digits_end_to_end.py [--seeds 0 1 2] [--before-seeds 0]

Needs ``.venv-openclip`` (``make bench-peer``). Run it on a quiet machine: the times are the
result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "digits_end_to_end.json"
PEER_PYTHON = ROOT / ".venv-openclip" / "bin" / "python"
VLP = Path(sys.executable).parent / "vlp"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "a photo of the digit {c}."
BATCH = 64
VARIANTS = ("vlp", "open_clip", "vlp-1-thread")
SETTINGS = {"lr": 1e-3, "wd": 0.1, "warmup": 50, "clip": 1.0}


def write_class_folders(root: Path) -> tuple[Path, Path]:
    """digits as ``train/<name>/*.png`` and ``heldout/<name>/*.png`` (every 5th of a class)."""
    digits = load_digits()
    seen = dict.fromkeys(range(10), 0)
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "heldout" if seen[int(label)] % 5 == 4 else "train"
        seen[int(label)] += 1
        folder = root / split / NAMES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255 / 16), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return root / "train", root / "heldout"


def write_shards(folder: Path, out: Path) -> None:
    subprocess.run(
        [str(VLP), "shards", "write", str(folder), str(out), "--image-format", "png",
         "--samples-per-shard", "200", "--caption-template", TEMPLATE],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def model_config_file(name: str, folder: Path) -> Path:
    """The model's config as ``<name>.json`` (open_clip_train registers it by file name)."""
    from vlp.models import model_config

    path = folder / f"{name}.json"
    path.write_text(json.dumps(model_config(name)))
    return path


def vlp_command(args: argparse.Namespace, shards: Path, out: Path, seed: int, threads: int) -> list:
    return [
        str(VLP), "train", "--config", str(ROOT / "launch" / "configs" / "demo.yaml"),
        f"model.name={args.model}", f"data.train_shards={shards}", f"data.batch_size={BATCH}",
        "data.workers=1", "data.resampled=true", f"train.steps={args.steps}",
        f"train.seed={seed}", f"train.out_dir={out}", f"train.threads={threads}",
        f"optim.lr={SETTINGS['lr']}", f"optim.weight_decay={SETTINGS['wd']}",
        f"optim.warmup_steps={SETTINGS['warmup']}", f"optim.grad_clip={SETTINGS['clip']}",
        f"train.checkpoint_every={args.steps}", "train.report_to=[]",
    ]  # fmt: skip


def open_clip_command(
    args: argparse.Namespace, config: Path, shards: Path, out: Path, seed: int
) -> list:
    tars = sorted(p.stem for p in shards.glob("*.tar"))
    return [
        str(PEER_PYTHON), str(ROOT / "benchmarks" / "openclip_main_peer.py"), str(config), "--",
        "--model", args.model, "--train-data", f"{shards}/{{{tars[0]}..{tars[-1]}}}.tar",
        "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(args.steps * BATCH), "--batch-size", str(BATCH),
        "--epochs", "1", "--workers", "1", "--precision", "fp32", "--seed", str(seed),
        "--lr", str(SETTINGS["lr"]), "--wd", str(SETTINGS["wd"]), "--beta1", "0.9",
        "--beta2", "0.98", "--eps", "1e-6", "--warmup", str(SETTINGS["warmup"]),
        "--grad-clip-norm", str(SETTINGS["clip"]), "--logs", str(out.parent),
        "--name", out.name, "--save-frequency", "1", "--zeroshot-frequency", "0",
        "--val-frequency", "0", "--log-every-n-steps", "50", "--report-to", "",
    ]  # fmt: skip


def timed(command: list, log: Path) -> float:
    """Wall seconds of ``command`` (its output to ``log``); raises if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): see {log}")
    return seconds


def zero_shot(model: list[str], heldout: Path, out: Path) -> float:
    """Top-1 zero-shot accuracy of ``vlp eval zeroshot --model ...`` on the held-out shards."""
    templates = out / "templates.json"
    templates.parent.mkdir(parents=True, exist_ok=True)
    templates.write_text(json.dumps([TEMPLATE]))
    subprocess.run(
        [str(VLP), "eval", "zeroshot", *model, "--dataset", str(heldout), "--out", str(out),
         "--templates", str(templates), "--workers", "1"],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    (result,) = [p for p in out.glob("*.json") if p.name != "templates.json"]
    return float(json.loads(result.read_text())["metrics"]["acc1"])


def one_run(
    variant: str, args: argparse.Namespace, work: Path, config: Path, seed: int
) -> dict[str, Any]:
    out = work / "runs" / f"{variant}-{seed}"
    shards, heldout = work / "shards" / "train", work / "shards" / "heldout"
    if variant == "open_clip":
        seconds = timed(
            open_clip_command(args, config, shards, out, seed), work / f"{out.name}.log"
        )
        weights = out / "checkpoints" / "epoch_1.pt"
        model = ["--model", str(config), "--pretrained", str(weights)]
    else:
        threads = 1 if variant == "vlp-1-thread" else 0
        seconds = timed(vlp_command(args, shards, out, seed, threads), work / f"{out.name}.log")
        model = ["--model", str(out)]
    accuracy = zero_shot(model, heldout, work / "evals" / out.name)
    row = {"variant": variant, "seed": seed, "seconds": seconds, "zeroshot_acc1": accuracy}
    print(json.dumps(row), flush=True)
    return row


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± standard deviation per variant, and time against open_clip's mean."""
    table = []
    base = statistics.mean(r["seconds"] for r in rows if r["variant"] == "open_clip")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        seconds = [r["seconds"] for r in mine]
        accuracy = [r["zeroshot_acc1"] for r in mine]
        spread = statistics.stdev if len(mine) > 1 else (lambda _: 0.0)
        table.append({
            "variant": variant, "runs": len(mine),
            "seconds": statistics.mean(seconds), "seconds_sd": spread(seconds),
            "zeroshot_acc1": statistics.mean(accuracy), "zeroshot_acc1_sd": spread(accuracy),
            "time_vs_open_clip": statistics.mean(seconds) / base,
        })  # fmt: skip
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | runs | seconds | zero-shot acc1 | time vs open_clip_train |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['variant']} | {r['runs']} | {r['seconds']:.1f} ± {r['seconds_sd']:.1f} | "
            f"{r['zeroshot_acc1']:.3f} ± {r['zeroshot_acc1_sd']:.3f} | "
            f"{r['time_vs_open_clip']:.2f}× |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=312)
    parser.add_argument("--model", default="vlp-tiny-vit")
    parser.add_argument("--before-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="keep the shards and runs here (default: temp)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not PEER_PYTHON.exists():
        raise SystemExit("needs .venv-openclip (make bench-peer)")
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        train, heldout = write_class_folders(work / "digits")
        write_shards(train, work / "shards" / "train")
        write_shards(heldout, work / "shards" / "heldout")
        config = model_config_file(args.model, work)
        rows = []
        for n, seed in enumerate(args.seeds):
            variants = VARIANTS if seed in args.before_seeds else VARIANTS[:2]
            order = variants if n % 2 == 0 else variants[::-1]
            rows += [one_run(variant, args, work, config, seed) for variant in order]
    table = summary(rows)
    print(markdown(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cores": len(os.sched_getaffinity(0)), "steps": args.steps, "batch": BATCH,
        "settings": SETTINGS, "runs": rows, "summary": table,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
