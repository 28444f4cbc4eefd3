"""Per-sample cost of each augmentation preset (``data_pipelines.augment``), decode excluded.

Each transform runs on a pre-decoded RGB PIL image (256x256 and 512x384), one torch thread,
torch's CPU generator seeded before every call as the stream does, ``--reps`` calls per round,
rounds interleaved across transforms (so drift on a shared machine hits all alike). Reports the
mean wall time per sample and the mean CPU time of the calling thread (the cost without the
waits that other processes add to wall time on a shared machine). Rows:

- the presets (uint8 [3, S, S] out; normalisation happens later, once per batch on the device);
- open_clip's own ``image_transform(S, is_train=True)``, the anchor for ``openclip`` (float
  normalised out: its RandomResizedCrop(0.9, 1) with Pillow's bicubic, ToTensor, Normalize);
- ``convirt`` with torchvision's own GaussianBlur, to show what the matrix-product blur saves.

Prints a table and writes ``benchmarks/results/augment_presets.json``.

    .venv/bin/python benchmarks/augment_presets.py [--size 224] [--reps 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from data_pipelines.augment import Augmentation, build_preset, list_presets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "augment_presets.json"
INPUTS = {"256x256": (256, 256), "512x384": (512, 384)}
ANCHOR = "open_clip image_transform (anchor)"


def photo(width: int, height: int) -> Image.Image:
    """A smooth colour field with noise, standing in for a decoded photo."""
    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    base = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray((base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8))


def cpu_name() -> str:
    """The CPU model, for comparing runs (Linux; else the architecture)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def with_torchvision_blur(preset: Augmentation) -> Augmentation:
    """The preset with torchvision's GaussianBlur (same kernel, same sigma range) in place of
    ours, for its top-level blur."""
    assert preset.ops is not None
    ops = [
        v2.GaussianBlur(op.kernel_size, op.sigma) if isinstance(op, v2.GaussianBlur) else op
        for op in preset.ops.transforms
    ]
    return dataclasses.replace(preset, ops=v2.Compose(ops))


def transforms(size: int) -> dict[str, tuple[Callable[[Image.Image], torch.Tensor], str]]:
    """Row name -> (transform, what it outputs)."""
    rows: dict[str, tuple[Callable[[Image.Image], torch.Tensor], str]] = {
        name: (build_preset(name, size), "uint8") for name in list_presets()
    }
    anchor = open_clip.image_transform(size, is_train=True)
    rows[ANCHOR] = (anchor, "float32, normalised")
    convirt = build_preset("convirt", size)
    assert isinstance(convirt, Augmentation)
    rows["convirt, torchvision GaussianBlur"] = (with_torchvision_blur(convirt), "uint8")
    return rows


def time_round(
    transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, reps: int
) -> tuple[float, float]:
    """Mean (wall, this thread's CPU) seconds per call over ``reps`` calls, each after seeding as
    the stream does. With one torch thread all the work is on this thread, so CPU time is the
    cost without the waits that other processes on a shared machine add to wall time."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(reps):
        torch.default_generator.manual_seed(i)
        transform(image)
    return (time.perf_counter() - wall) / reps, (time.thread_time() - cpu) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="output side S")
    parser.add_argument("--reps", type=int, default=100, help="calls per transform per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = transforms(args.size)
    images = {label: photo(*wh) for label, wh in INPUTS.items()}
    rounds: dict[tuple[str, str], list[tuple[float, float]]] = {
        (r, i): [] for r in rows for i in images
    }
    for transform, _ in rows.values():  # warm-up: first-call allocations, lazy imports
        for image in images.values():
            time_round(transform, image, 5)
    for _ in range(args.rounds):
        for label, image in images.items():
            for name, (transform, _) in rows.items():
                rounds[name, label].append(time_round(transform, image, args.reps))

    def mean_ms(name: str, label: str, which: int) -> float:
        return statistics.fmean(t[which] for t in rounds[name, label]) * 1e3

    results: list[dict[str, Any]] = []
    for name, label in rounds:
        wall, cpu = mean_ms(name, label, 0), mean_ms(name, label, 1)
        results.append({
            "transform": name,
            "input": label,
            "output": rows[name][1],
            "wall_ms_per_sample": round(wall, 3),
            "cpu_ms_per_sample": round(cpu, 3),
            "cpu_relative_to_open_clip": round(cpu / mean_ms(ANCHOR, label, 1), 3),
            "wall_ms_per_round": [round(w * 1e3, 3) for w, _ in rounds[name, label]],
        })  # fmt: skip

    print(f"\nPer-sample cost in ms, S={args.size}, 1 torch thread, decode excluded, "
          f"{args.rounds}x{args.reps} calls; CPU = this thread's CPU time (x the anchor's)\n")  # fmt: skip
    cols = [f"{i} {kind}" for i in images for kind in ("CPU", "wall")]
    print("| transform | output | " + " | ".join(cols) + " |\n|" + "---|" * (2 + len(cols)))
    for name, (_, output) in rows.items():
        cells = [
            f"{r['cpu_ms_per_sample']:.2f} ({r['cpu_relative_to_open_clip']:.2f}x) | "
            f"{r['wall_ms_per_sample']:.2f}"
            for r in results
            if r["transform"] == name
        ]
        print(f"| {name} | {output} | " + " | ".join(cells) + " |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {
            "size": args.size, "reps": args.reps, "rounds": args.rounds, "torch_threads": 1,
            "inputs": INPUTS, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "cpu": cpu_name(),
        },
        "results": results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
