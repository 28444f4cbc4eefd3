"""Training throughput on one GPU, vlp against open_clip_train, side by side (issue 22).

One command, about 5 minutes of GPU time with its defaults (``--budget-s 300``, data included):

1. writes synthetic JPEG shards (``--samples`` 20,000 images of random size in 256–512 px, a
   smooth colour field plus noise, quality 90, so that decoding and resizing cost what they do
   on photos) into ``--data`` on local disk, in parallel; kept for a rerun;
2. runs, back to back on those shards, each in its own process: vlp (``throughput_vlp.py``:
   ``Trainer.train_step`` on vlp's stream) and open_clip_train (``openclip_train_peer.py``: its
   ``get_wds_dataset`` and its step, in its own environment), ViT-B/32 and ViT-B/16 at 224 px,
   bf16 autocast, batch 256, as many data workers as cores, ``--warmup`` untimed steps then
   ``--steps`` timed ones; then vlp's fast paths, one at a time (``VARIANTS``; ``--no-variants`` leaves them out): float32
   batches normalised in the workers instead of uint8 ones in pinned memory normalised on the
   GPU (vlp's default there, ``data.uint8_batches=auto``), the unfused AdamW, FLIP patch
   dropout 0.5, torch.compile. Gradient clipping is off on both sides
   (open_clip_train's default). A run that would not end inside ``--budget-s`` is skipped, and
   the table says so;
3. prints one table and writes it as JSON (``--out``): samples/s (median over the timed steps),
   time per step split into data wait and compute, the fraction of time spent waiting for data,
   peak GPU memory, MFU (forward FLOPs per sample counted by torch's FlopCounterMode on the
   training model, x3 for the step, over the GPU's dense bf16 peak: 989 TFLOP/s for an H100 SXM
   or an H200), vlp/open_clip, and each side's compute-only ceiling (the same step repeated on
   one batch already on the GPU).

``--cpu`` is the same script at smoke size (the tiny ViT, 32 px, a few hundred 40–72 px images,
batch 16, a few steps, fp32): what CI runs so that the GPU run has nothing left to debug.

    python benchmarks/gpu_throughput.py [--cpu] [--peer-python PY] [--peer-path DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.write import write_shards

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
PEER_PYTHON = ROOT / ".venv-openclip" / "bin" / "python"
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 tensor-core peak by GPU name (NVIDIA's datasheets, SXM parts)."""
LIKE_OPEN_CLIP = ["optim.grad_clip=null"]
"""vlp's settings that open_clip_train's defaults have: no gradient clipping."""
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""The CPU mode's model: a one-block ViT at 16 px (as the loop's tests use), written as a config
file into the data folder, which both sides read (open_clip does not know vlp's names)."""
TINY_NAME = "vlp-throughput-tiny.json"
VARIANTS = {
    "data.uint8_batches=false": "ViT-B-32",
    "optim.fused=false": "ViT-B-16",
    "model.patch_dropout=0.5": "ViT-B-32,ViT-B-16",
    "train.compile=true": "ViT-B-16",
}
"""vlp's fast paths measured after the main comparison, each on the models named."""
CPU_VARIANTS = {
    "data.uint8_batches=true": TINY_NAME,
    "optim.fused=true": TINY_NAME,
    "model.patch_dropout=0.5": TINY_NAME,
    "train.compile=true train.compile_backend=eager": TINY_NAME,
}
"""The CPU mode's: the same settings (the fused CPU kernel; graph capture without code
generation, seconds instead of minutes)."""
GPU = {
    "models": ["ViT-B-32", "ViT-B-16"], "samples": 20_000, "sides": (256, 512),
    "batch_size": 256, "warmup": 5, "steps": 20, "ceiling_steps": 5, "precision": "bf16",
    "data": "/tmp/vlp_gpu_throughput", "per_shard": 500,
}  # fmt: skip
CPU = {
    "models": [TINY_NAME], "samples": 192, "sides": (40, 72), "batch_size": 16,
    "warmup": 1, "steps": 2, "ceiling_steps": 1, "precision": "fp32",
    "data": str(ROOT / "runs" / "bench_gpu_throughput_cpu"), "per_shard": 48,
}  # fmt: skip


def synthetic_jpeg(index: int, sides: tuple[int, int]) -> dict[str, Any]:
    """Sample ``index``: a JPEG of random size within ``sides`` (a bicubic colour field plus
    noise, photo-like in decode cost) and a caption."""
    rng = np.random.default_rng(index)
    width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    colour = ("red", "green", "blue", "golden", "grey", "purple")[index % 6]
    return {"key": f"{index:09d}", "image": buffer.getvalue(), "txt": f"a {colour} field #{index}"}


def ensure_shards(folder: Path, samples: int, sides: tuple[int, int], per_shard: int) -> float:
    """Write the shards once (``processes`` = cores); the seconds it took (0 when kept)."""
    sizes = folder / "sizes.json"
    if sizes.exists() and sum(json.loads(sizes.read_text()).values()) == samples:
        return 0.0
    started = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        items = pool.imap(_sample, ((i, sides) for i in range(samples)), chunksize=64)
        write_shards(items, folder, samples_per_shard=per_shard, overwrite=True)
    return time.perf_counter() - started


def _sample(args: tuple[int, tuple[int, int]]) -> dict[str, Any]:
    return synthetic_jpeg(*args)


def side_command(side: str, model: str, settings: list[str], opts: argparse.Namespace) -> list[str]:
    """The command line of one side's run."""
    script = "throughput_vlp.py" if side == "vlp" else "openclip_train_peer.py"
    python = sys.executable if side == "vlp" else opts.peer_python
    command = [python, str(HERE / script), "--shards", opts.data, "--model", model]
    for flag in ("batch_size", "workers", "warmup", "steps", "ceiling_steps", "precision"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(opts, flag))]
    return command + (["--set", *LIKE_OPEN_CLIP, *settings] if side == "vlp" else [])


def run_side(command: list[str], opts: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run one side in its own process (its result: the last line it prints), or with
    ``--in-process`` in this one (the CPU test: no new interpreter to import torch into)."""
    if opts.in_process:
        return in_process(command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(ROOT), env.get("PYTHONPATH", "")]
    if command[1].endswith("openclip_train_peer.py"):
        paths = [opts.peer_path or "", env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:3])} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def in_process(command: list[str]) -> dict[str, Any]:
    """``command``'s side run in this process (``benchmarks/`` on ``sys.path``)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    if command[1].endswith("throughput_vlp.py"):
        import throughput_vlp

        return throughput_vlp.run(throughput_vlp.parser().parse_args(command[2:]))
    try:
        import openclip_train_peer
    except ImportError as error:  # open_clip_train needs pandas and webdataset<=0.2.86
        raise RuntimeError(
            f"open_clip_train does not import in this environment: {error}"
        ) from None
    return openclip_train_peer.run(openclip_train_peer.parser().parse_args(command[2:]))


def plan(opts: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(side, model, vlp settings) of every run, most important first: vlp and open_clip on
    each model, then each fast path."""
    runs = [(side, m, []) for m in opts.models for side in ("vlp", "open_clip")]
    for setting, models in opts.variants.items():
        chosen = models.split(",")
        runs += [("vlp", m, setting.split()) for m in opts.models if Path(m).name in chosen]
    return runs


def measure(opts: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Every planned run inside the budget; the rows and what was skipped (and why)."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for side, model, settings in plan(opts):
        name = f"{model} {side} {' '.join(settings)}".strip()
        left = opts.budget_s - (time.perf_counter() - opts.started)
        if side == "open_clip" and opts.skip_peer:
            skipped.append(f"{name}: --skip-peer")
            continue
        if left < opts.run_s:
            skipped.append(f"{name}: {left:.0f} s of --budget-s left, a run takes ~{opts.run_s} s")
            continue
        started = time.perf_counter()
        try:
            row = run_side(side_command(side, model, settings, opts), opts, left)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            skipped.append(f"{name}: {str(error).strip().splitlines()[-1]}")
            continue
        rows.append({"model": Path(model).stem, **row, "run_s": time.perf_counter() - started})
        print(f"  {Path(model).stem} {side} {' '.join(settings)}: {row['samples_per_s']:.1f}/s")
    return rows, skipped


def add_ratios(rows: list[dict[str, Any]], peak: float | None) -> None:
    """MFU (with the FLOPs vlp counted for the same model and settings) and vlp/open_clip."""
    flops = {
        (r["model"], tuple(r["settings"])): r["forward_flops_per_sample"]
        for r in rows
        if r["side"] == "vlp"
    }
    peer = {r["model"]: r["samples_per_s"] for r in rows if r["side"] == "open_clip"}
    for row in rows:
        per_sample = flops.get((row["model"], tuple(row["settings"])))
        row["mfu"] = 3 * per_sample * row["samples_per_s"] / peak if peak and per_sample else None
        other = peer.get(row["model"])
        row["vlp_over_open_clip"] = (
            row["samples_per_s"] / other if row["side"] == "vlp" and other else None
        )


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["model", "side", "settings", "samples/s", "step ms", "data ms", "compute ms",
              "wait %", "peak GiB", "MFU", "ceiling/s", "vlp/open_clip"]  # fmt: skip
    print(" | ".join(header))
    for r in rows:
        cells = [
            r["model"], r["side"], " ".join(r["settings"]) or "-", r["samples_per_s"],
            r["step_s"] * 1e3, r["data_wait_s"] * 1e3, r["compute_s"] * 1e3,
            100 * r["data_wait_fraction"], r["peak_memory_gib"], r["mfu"],
            r["ceiling_samples_per_s"], r["vlp_over_open_clip"],
        ]  # fmt: skip
        print(
            " | ".join(
                "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells
            )
        )


def device_name() -> str:
    """The GPU's name (``cpu`` without one)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke size on the CPU (for CI)")
    parser.add_argument("--budget-s", type=float, default=300, help="skip runs past this")
    parser.add_argument("--run-s", type=float, default=20, help="a run's least time, for it")
    parser.add_argument("--workers", type=int, default=None, help="default: the cores")
    parser.add_argument("--peer-python", default=str(PEER_PYTHON), help="open_clip's python")
    parser.add_argument("--peer-path", default=None, help="put first on the peer's PYTHONPATH")
    parser.add_argument("--skip-peer", action="store_true", help="no open_clip side")
    parser.add_argument("--in-process", action="store_true", help="sides in this process")
    parser.add_argument("--no-variants", action="store_true", help="no fast-path rows")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/)")
    opts, rest = parser.parse_known_args(argv)
    defaults = CPU if opts.cpu else GPU
    sized = argparse.ArgumentParser()
    for key, value in defaults.items():
        kind = type(value[0]) if isinstance(value, list | tuple) else type(value)
        nargs = "+" if isinstance(value, list | tuple) else None
        sized.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs=nargs, default=value)
    opts = argparse.Namespace(**vars(opts), **vars(sized.parse_args(rest)))
    opts.sides = tuple(opts.sides)
    if opts.workers is None:
        opts.workers = 1 if opts.cpu else len(os.sched_getaffinity(0))
    opts.variants = {} if opts.no_variants else CPU_VARIANTS if opts.cpu else VARIANTS
    name = "gpu_throughput_cpu.json" if opts.cpu else "gpu_throughput.json"
    opts.out = opts.out or str(HERE / "results" / name)
    return opts


def write_result(out: str, result: dict[str, Any]) -> None:
    """``result`` as JSON at ``out`` (its folder made), and a line saying where and how long the
    whole run took (``result["total_s"]``)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['total_s']:.0f} s in all)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write the data, run every side, print the table, write the JSON; returns it."""
    opts = parse(argv)
    opts.started = time.perf_counter()
    folder = Path(opts.data)
    write_s = ensure_shards(folder, opts.samples, opts.sides, opts.per_shard)
    if opts.cpu:
        (folder / TINY_NAME).write_text(json.dumps(TINY))
        opts.models = [str(folder / m) if m == TINY_NAME else m for m in opts.models]
    print(f"data: {opts.samples} samples in {folder} ({write_s:.1f} s to write)", flush=True)
    name = device_name()
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)
    rows, skipped = measure(opts)
    add_ratios(rows, peak)
    print_table(rows)
    for line in skipped:
        print(f"skipped {line}")
    result = {
        "device": name,
        "bf16_peak_flops": peak,
        "cores": len(os.sched_getaffinity(0)),
        "data_write_s": write_s,
        "total_s": time.perf_counter() - opts.started,
        "settings": {k: v for k, v in vars(opts).items() if k != "started"},
        "rows": rows,
        "skipped": skipped,
    }
    write_result(opts.out, result)
    return result


if __name__ == "__main__":
    main()
