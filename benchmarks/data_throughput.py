"""Data-stream throughput: vlp's training stream vs open_clip's webdataset pipeline, same run.

Writes shards of procedural JPEGs (colour fields, texture and noise, quality 90; ~60 KB at
512x384) at 512x384 and 1024x768 under ``runs/bench_data_throughput/`` (kept for later runs),
then:

1. levers, one sample at a time in this process, in CPU time of this thread (robust to whatever
   else the machine runs): decode (full / draft), crop+resize (open_clip's torchvision
   RandomResizedCrop, one Pillow call at several ``reducing_gap``, vlp's ``TrainTransform``),
   to tensor (float ToTensor+Normalize vs uint8), batch stacking, normalising, tokenising; with
   each crop's mean absolute difference from torchvision's pixels for the same box;
2. rounds, in wall-clock time: decode-only, ``Image.open(...).convert("RGB")`` of 64 of the same
   JPEGs in one process (the per-core limit); then samples/s to batched 224 px tensors for 1 and
   2 workers: vlp = ``make_train_stream`` with the fast transforms and JPEG draft decoding,
   uint8 batches normalised in this process (counted); open_clip =
   ``open_clip_train.data.get_wds_dataset`` run by ``openclip_wds_peer.py`` in
   ``.venv-openclip`` (``make bench-peer``; ``--skip-peer`` leaves it out). Odd rounds run
   open_clip first;
3. with ``--profile``: where one worker's time goes, per sample and stage, in CPU time
   (``worker_profile.py``: tar reading, decode, seeds, crop box, crop+resize, collate,
   tokenise, the batch's pickling between processes, and what is left of the whole loop).

Prints tables and writes ``benchmarks/results/data_throughput.json``.

    .venv/bin/python benchmarks/data_throughput.py [--rounds 3] [--batches 16] [--profile] [--out F]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import PIL
import torch
from PIL import Image
from torchvision import transforms as T
from worker_profile import worker_profile

from data_pipelines.batch_fields import BatchFields
from data_pipelines.decode import decode_for_transforms
from data_pipelines.stream import make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.transforms import FastTransforms, TrainTransform, fast_transforms
from data_pipelines.write import write_shards

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data_throughput.json"
PEER_PYTHON = ROOT / ".venv-openclip" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "openclip_wds_peer.py"
SIZES = {"512x384": (512, 384), "1024x768": (1024, 768)}
SHARDS, PER_SHARD = 8, 64
REFERENCE = T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
"""open_clip's train crop for a 224 px model (``open_clip.image_transform(224, is_train=True)``)."""


def textured_image(index: int, width: int, height: int) -> Image.Image:
    """A photo-like test image: smooth colour field + oriented texture + Gaussian noise."""
    rng = np.random.default_rng(index)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    (f1, f2), theta = rng.uniform(0.02, 0.12, 2), rng.uniform(0, np.pi)
    u, v = x * np.cos(theta) + y * np.sin(theta), y * np.cos(theta) - x * np.sin(theta)
    texture = 30 * np.sin(f1 * u) * np.sin(f2 * v)
    noise = 8 * rng.standard_normal((height, width, 3), dtype=np.float32)
    pixels = base + texture[..., None] + noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def ensure_shards(folder: Path, width: int, height: int) -> str:
    """Write (once) SHARDS x PER_SHARD samples of ``width x height`` JPEGs; return the URLs."""
    sizes = folder / "sizes.json"
    if not (sizes.exists() and sum(json.loads(sizes.read_text()).values()) == SHARDS * PER_SHARD):
        samples = (
            {"key": f"{i:09d}", "image": textured_image(i, width, height), "txt": caption(i)}
            for i in range(SHARDS * PER_SHARD)
        )
        write_shards(samples, folder, samples_per_shard=PER_SHARD, quality=90, overwrite=True)
    return f"{folder}/{{00000..{SHARDS - 1:05d}}}.tar"


def caption(index: int) -> str:
    colours = ("red", "green", "blue", "golden", "grey", "purple")
    things = ("field", "wall", "fabric", "river", "forest", "street")
    return f"a {colours[index % 6]} {things[index // 6 % 6]} photographed from afar, #{index}"


def read_jpegs(folder: Path, n: int) -> list[bytes]:
    """The first ``n`` JPEGs of the folder's first shard, as bytes."""
    with tarfile.open(folder / "00000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:n]
        return [tar.extractfile(m).read() for m in members]  # type: ignore[union-attr]


def decode(data: bytes, draft: int | None = None) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if draft:
            image.draft("RGB", (draft, draft))
        return image.convert("RGB")


def ms_per_item(
    fn: Callable[[Any], Any],
    items: list[Any],
    repeats: int = 3,
    clock: Callable[[], float] = time.thread_time,
) -> float:
    """Median over ``repeats`` passes of the milliseconds ``fn`` takes per item. The default
    clock is this thread's CPU time: what the work costs, whatever else the machine runs."""
    times = []
    for _ in range(repeats):
        started = clock()
        for item in items:
            fn(item)
        times.append((clock() - started) * 1000 / len(items))
    return statistics.median(times)


def seeded(fn: Callable[[Any], Any], seed: int) -> Callable[[Any], Any]:
    """``fn`` with torch's global RNG seeded first (the same crop box for the same seed)."""

    def call(item: Any) -> Any:
        torch.manual_seed(seed)
        return fn(item)

    return call


def mean_abs_diff(a: Image.Image | torch.Tensor, b: Image.Image) -> float:
    """Mean |a - b| in 0..255 units; ``a`` a PIL image or a uint8 CHW tensor."""
    pixels = a.permute(1, 2, 0).numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return float(np.abs(pixels.astype(np.int16) - np.asarray(b, dtype=np.int16)).mean())


def draft_diff(
    images: list[Image.Image], drafted: list[Image.Image], refs: list[Image.Image]
) -> float:
    """The draft's own effect: each reference box, scaled onto the drafted image, resized there."""
    diffs = []
    for i, (image, small, ref) in enumerate(zip(images, drafted, refs, strict=True)):
        box = seeded(TrainTransform((224, 224)).crop_box, i)(image)
        scaled = tuple(v * small.size[0] / image.size[0] for v in box)
        diffs.append(
            mean_abs_diff(small.resize((224, 224), Image.Resampling.BICUBIC, box=scaled), ref)
        )
    return statistics.mean(diffs)


def pil_one_call(reducing_gap: float | None) -> Callable[[Image.Image], Image.Image]:
    """Crop and resize in one Pillow call (``resize(box=...)``), the same box as torchvision."""
    crop = TrainTransform((224, 224))

    def run(image: Image.Image) -> Image.Image:
        box = crop.crop_box(image)
        return image.resize(
            (224, 224), Image.Resampling.BICUBIC, box=box, reducing_gap=reducing_gap
        )

    return run


def uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def crop_rows(
    images: list[Image.Image],
    drafted: list[Image.Image],
    refs: list[Image.Image],
    fast: FastTransforms,
) -> list[dict[str, Any]]:
    """Crop+resize to 224 px: torchvision's (open_clip's), one Pillow call at several
    ``reducing_gap``, and vlp's ``TrainTransform``; each with its mean |difference| from
    torchvision's pixels ``refs`` for the same boxes (seed i for image i)."""
    candidates: dict[str, Callable[[Image.Image], Any]] = {
        f"one Pillow call, reducing_gap={gap}": pil_one_call(gap) for gap in (None, 2.0, 3.0)
    }
    candidates["vlp TrainTransform (torch bicubic AA on uint8), uint8 out"] = fast.train
    rows: list[dict[str, Any]] = [
        {
            "step": "crop+resize: torchvision RandomResizedCrop (open_clip)",
            "ms": ms_per_item(REFERENCE, images),
        }
    ]
    for name, transform in candidates.items():
        outs = [seeded(transform, i)(image) for i, image in enumerate(images)]
        diff = statistics.mean(map(mean_abs_diff, outs, refs))
        rows.append(
            {
                "step": f"crop+resize: {name}",
                "ms": ms_per_item(transform, images),
                "mean_abs_diff": diff,
            }
        )
    if drafted[0].size != images[0].size:
        rows.append(
            {
                "step": f"crop+resize: vlp TrainTransform of the {drafted[0].size} draft",
                "ms": ms_per_item(fast.train, drafted),
            }
        )
    return rows


def levers(jpegs: list[bytes], fast: FastTransforms) -> list[dict[str, Any]]:
    """Per-sample CPU cost (ms) of each step, open_clip's way and the fast way, on ``jpegs``."""
    draft = fast.draft_size
    images, drafted = [decode(j) for j in jpegs], [decode(j, draft) for j in jpegs]
    arrays = [decode_for_transforms(j, draft_size=draft) for j in jpegs]
    rows: list[dict[str, Any]] = [
        {"step": "decode, full", "ms": ms_per_item(decode, jpegs)},
        {"step": f"decode, draft {draft}", "ms": ms_per_item(lambda j: decode(j, draft), jpegs)},
        {
            "step": f"decode, draft {draft}, into an array (simplejpeg; vlp's stream)",
            "ms": ms_per_item(lambda j: decode_for_transforms(j, draft_size=draft), jpegs),
            "same_pixels_as_pillow": all(
                np.array_equal(np.asarray(a), np.asarray(d))
                for a, d in zip(arrays, drafted, strict=True)
            ),
        },
    ]
    refs = [seeded(REFERENCE, i)(image) for i, image in enumerate(images)]
    if drafted[0].size != images[0].size:
        rows[1]["mean_abs_diff"] = rows[2]["mean_abs_diff"] = draft_diff(images, drafted, refs)
    to_float = T.Compose([T.ToTensor(), T.Normalize(fast.mean, fast.std)])
    floats, uint8s = [to_float(r) for r in refs], [uint8_chw(r) for r in refs]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    texts = [caption(i) for i in range(64)]
    return (
        rows
        + crop_rows(images, drafted, refs, fast)
        + [
            {
                "step": "crop+resize: vlp TrainTransform of the stream's array (no PIL copies)",
                "ms": ms_per_item(fast.train, arrays),
            }
        ]
        + [
            {"step": "to tensor: ToTensor + Normalize (float)", "ms": ms_per_item(to_float, refs)},
            {"step": "to tensor: uint8 CHW", "ms": ms_per_item(uint8_chw, refs)},
            {"step": "stack 64: float", "ms": ms_per_item(torch.stack, [floats]) / 64},
            {"step": "stack 64: uint8", "ms": ms_per_item(torch.stack, [uint8s]) / 64},
            {
                "step": "normalize_images, 64 uint8 (1 thread)",
                "ms": ms_per_item(fast.normalize, [torch.stack(uint8s)]) / 64,
            },
            {
                "step": "tokenize: per sample + stack (open_clip)",
                "ms": ms_per_item(lambda ts: torch.stack([tokenizer(t)[0] for t in ts]), [texts])
                / 64,
            },
            {
                "step": "tokenize: one call per batch (vlp)",
                "ms": ms_per_item(tokenizer, [texts]) / 64,
            },
        ]
    )


def decode_only_rate(jpegs: list[bytes], clock: Callable[[], float]) -> float:
    """Images/s of a plain full decode in one process: the most one core can feed."""
    return 1000 / ms_per_item(decode, jpegs, repeats=1, clock=clock)


def timed_rate(batches: Iterator[Any], consume: Callable[[Any], Any], opts: Any) -> float:
    """Samples/s over ``opts.batches`` batches after ``opts.warmup`` untimed ones."""
    for _ in range(opts.warmup):
        consume(next(batches))
    started = time.perf_counter()
    for _ in range(opts.batches):
        consume(next(batches))
    return opts.batches * opts.batch_size / (time.perf_counter() - started)


def vlp_rate(urls: str, fast: FastTransforms, workers: int, seed: int, opts: Any) -> float:
    """vlp's stream: uint8 batches from the workers, normalised here (counted)."""
    settings = StreamSettings(
        batch_size=opts.batch_size,
        workers=workers,
        seed=seed,
        resampled=True,
        draft_size=fast.draft_size,
    )
    fields = BatchFields.single(fast.train, open_clip.get_tokenizer("ViT-B-32"))
    loader = make_train_stream(urls, settings, fields=fields)
    return timed_rate(iter(loader), lambda batch: fast.normalize(batch["image"]), opts)


def peer_rate(urls: str, workers: int, seed: int, opts: Any) -> float:
    """open_clip's ``get_wds_dataset`` in its own environment (a subprocess)."""
    command = [str(PEER_PYTHON), str(PEER_SCRIPT), "--train-data", urls]
    for flag, value in (
        ("--batch-size", opts.batch_size),
        ("--workers", workers),
        ("--warmup", opts.warmup),
        ("--batches", opts.batches),
        ("--seed", seed),
    ):
        command += [flag, str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"open_clip peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"])


def throughput(
    urls: dict[str, str], jpegs: dict[str, list[bytes]], fast: FastTransforms, opts: Any
) -> list[dict[str, Any]]:
    """Rounds of (decode-only, vlp, open_clip) per size and worker count; odd rounds run
    open_clip first. Wall-clock rates, each side's median over the rounds."""
    keys = [(size, w) for size in urls for w in opts.workers]
    rates: dict[tuple[str, int], dict[str, list[float]]] = {
        key: {"vlp": [], "open_clip": [], "load_avg_1min": []} for key in keys
    }
    decode_wall: dict[str, list[float]] = {size: [] for size in urls}
    for round_ in range(opts.rounds):
        for size in urls:
            decode_wall[size].append(decode_only_rate(jpegs[size], time.perf_counter))
        for size, workers in keys:
            runs = rates[size, workers]
            sides = ("vlp", "open_clip") if round_ % 2 == 0 else ("open_clip", "vlp")
            for side in sides if not opts.skip_peer else ("vlp",):
                runs["load_avg_1min"].append(os.getloadavg()[0])
                if side == "vlp":
                    rate = vlp_rate(urls[size], fast, workers, round_, opts)
                else:
                    rate = peer_rate(urls[size], workers, round_, opts)
                runs[side].append(rate)
                print(
                    f"  round {round_} {size} {workers} worker(s) {side}: {rate:.0f}/s", flush=True
                )
    rows = []
    for (size, workers), runs in rates.items():
        vlp = statistics.median(runs["vlp"])
        peer = statistics.median(runs["open_clip"]) if runs["open_clip"] else None
        decode = statistics.median(decode_wall[size])
        rows.append(
            {
                "images": size,
                "workers": workers,
                "open_clip_samples_per_s": peer,
                "vlp_samples_per_s": vlp,
                "vlp_over_open_clip": vlp / peer if peer else None,
                "decode_only_images_per_s": decode,
                "vlp_per_worker_over_decode_only": vlp / workers / decode,
                "runs": {**runs, "decode_only": decode_wall[size]},
            }
        )
    return rows


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n" + " | ".join(header))
    for row in rows:
        cells = (f"{v:.3g}" if isinstance(v, float) else "—" if v is None else str(v) for v in row)
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--batches", type=int, default=16, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_data_throughput"))
    parser.add_argument("--levers-only", action="store_true", help="skip the stream comparison")
    parser.add_argument("--skip-peer", action="store_true", help="no open_clip side")
    parser.add_argument("--profile", action="store_true", help="per-stage worker profile")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    opts = parser.parse_args()
    if not (opts.levers_only or opts.skip_peer) and not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `make bench-peer` or pass --skip-peer")
    torch.set_num_threads(1)  # like a data worker; normalize_images runs on one core here
    fast = fast_transforms({"size": 224})
    print(f"torch {torch.__version__}, Pillow {PIL.__version__}, {os.cpu_count()} cores, ")
    load_start = os.getloadavg()
    print(f"draft size {fast.draft_size}, load average {load_start}")
    folders = {size: Path(opts.data) / size for size in opts.sizes}
    urls = {size: ensure_shards(folder, *SIZES[size]) for size, folder in folders.items()}
    jpegs = {size: read_jpegs(folder, PER_SHARD) for size, folder in folders.items()}
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "settings": {k: v for k, v in vars(opts).items() if k not in ("data", "out")},
        "levers_cpu_ms_per_sample": {size: levers(jpegs[size], fast) for size in opts.sizes},
    }
    for size, rows in results["levers_cpu_ms_per_sample"].items():
        print_table(
            f"{size}: CPU ms per sample",
            ["step", "ms", "mean |diff| vs torchvision, 0..255", "same pixels as Pillow"],
            [
                [r["step"], r["ms"], r.get("mean_abs_diff", ""), r.get("same_pixels_as_pillow", "")]
                for r in rows
            ],
        )
    if opts.profile:
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        results["worker_profile_cpu_ms_per_sample"] = {}
        for size, folder in folders.items():
            rows = worker_profile(folder, fast, tokenizer)
            results["worker_profile_cpu_ms_per_sample"][size] = rows
            print_table(
                f"{size}: one worker's CPU ms per sample, by stage",
                ["stage", "ms", "us per tar member", "ratio", "minor page faults"],
                [
                    [
                        r["stage"],
                        r.get("ms", ""),
                        r.get("us_per_member", ""),
                        r.get("ratio", ""),
                        r.get("minor_faults", ""),
                    ]
                    for r in rows
                ],
            )
    if not opts.levers_only:
        results["throughput"] = throughput(urls, jpegs, fast, opts)
        print_table(
            "samples/s to batched 224 px tensors, wall clock, median of rounds",
            [
                "images",
                "workers",
                "open_clip",
                "vlp",
                "vlp/open_clip",
                "decode-only",
                "vlp/worker/decode-only",
            ],
            [
                [
                    r["images"],
                    r["workers"],
                    r["open_clip_samples_per_s"],
                    r["vlp_samples_per_s"],
                    r["vlp_over_open_clip"],
                    r["decode_only_images_per_s"],
                    r["vlp_per_worker_over_decode_only"],
                ]
                for r in results["throughput"]
            ],
        )
    results["load_average_start_end"] = [load_start, os.getloadavg()]
    print(f"load average at the end {os.getloadavg()}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
