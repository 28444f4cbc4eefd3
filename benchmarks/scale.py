"""Scale: the stream, the epoch deal, sidecars and the teacher's PCA from the demo's 10 shards to
LAION-sized shard lists and sidecars, simulated on this machine without writing terabytes.

- **Shards**: 10 real shards of the demo's 32 px procedural samples (500 each) under
  ``--data/real``; folders of N symlinks ``shard-%06d.tar`` to them with a ``sizes.json``
  (N = 41,408, LAION-400M's shard count, and 400,000), so expansion, ``sizes.json`` and epoch
  mode see N distinct shards.
- **Stream**: ``make_train_stream(folder, StreamSettings(batch_size=64, workers=1, resampled or
  epoch), fields=BatchFields.single(fast 32 px train transform, open_clip's tokenizer)`` [+ a
  ``SidecarField``]), each run in a fresh process: seconds to build the stream and to its first
  batch, then samples/s over ``--batches`` batches after the first (at most ``--seconds``), the
  worker's CPU time per sample, and the worker's memory after them (RSS, and USS: the pages it
  does not share with the main process). Configurations interleave over ``--rounds``; medians.
- **Start-up**: build and first batch at 400,000 shards, each tree and mode in turn
  (``--parts startup``; a tree's commit is recorded beside its rows).
- **Deal**: ``stream_plan._epoch_deal`` (its cache cleared) for 41,408 and 400,000 shards of
  9,000-10,000 samples at 8, 64, 512 and 4096 slots (ranks x 8 workers); and a cached call
  (what every ``epoch_quota`` pays: hashing the spec) and ``StreamSpec.fingerprint()``.
- **Sidecar**: 10^6 and 10^7 keys (9-digit sample keys, 4 float32 each) written with
  ``SidecarWriter``: write time and peak memory, file and header size, then in a fresh process
  (a worker) the time to open, microseconds per ``SidecarField.lookup`` of random present keys,
  and its RSS after them.
- **Teacher PCA**: ``launch.protoclip_teacher.fit_pca`` on n x w float32 features made chunk by
  chunk: peak RSS growth and time of a fresh process.

``--before PATH`` (a checkout of older code: ``git worktree add /tmp/vlp-before 71a1b1a``) runs
every measurement a second time with ``PYTHONPATH=PATH``, the "before" rows. Where the old code
lacks an API it measures the old equivalent: sidecars are one safetensors tensor per key
(``safetensors.torch.save_file``, at 10^5 keys: 10^7 would not open, see RESULTS.md), the PCA
takes the materialised ``[n, w]`` tensor, and deals above ``--old-deal-budget`` shards x slots
are extrapolated from the measured time per shard x slot. Prints tables and writes
``benchmarks/results/scale.json``; removes the symlinks and sidecars unless ``--keep``.

    .venv/bin/python benchmarks/scale.py [--before /tmp/vlp-before] [--rounds 3] [--batches 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
REAL_SHARDS, PER_SHARD = 10, 500
SAMPLES = REAL_SHARDS * PER_SHARD
LINKED = (41_408, 400_000)
SLOTS = (8, 64, 512, 4096)
WORKERS_PER_RANK = 8
ROW = 4  # float32 values per sidecar key
EXACT = 1 << 20  # row i holds (i * ROW + j) % EXACT: exact in float32, checked after lookups
MB = 1 << 20
PARTS = ("sidecar", "stream", "goal", "startup", "deal", "pca")


# ------------------------------------------------------------------ measurements (child side)


def _rss(pid: int | None = None) -> dict[str, int]:
    """RSS, USS (pages no other process maps), and RSS split into anonymous and file pages."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    status = Path(f"/proc/{pid or 'self'}/status").read_text().splitlines()
    kib = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status if "kB" in line}
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss, "rss_anon": kib["RssAnon"],
            "rss_file": kib["RssFile"]}  # fmt: skip


def child_stream(a: dict[str, Any]) -> dict[str, Any]:
    """Build a stream over ``a["urls"]``, time its first batch and its steady rate."""
    import dataclasses

    import open_clip
    import psutil
    import torch

    import data_pipelines
    from data_pipelines.batch_fields import BatchFields, SidecarField
    from data_pipelines.stream import make_train_stream
    from data_pipelines.stream_settings import StreamSettings
    from data_pipelines.transforms import fast_transforms

    torch.set_num_threads(1)
    fields = BatchFields.single(fast_transforms({"size": 32}).train, open_clip.tokenize)
    if a["sidecar"]:
        fields = dataclasses.replace(fields, sidecars=(SidecarField("teacher", a["sidecar"]),))
    workers = a.get("workers", 1)  # 0: in this process, whose CPU time is then the measure
    settings = StreamSettings(batch_size=64, workers=workers, resampled=a["resampled"])
    started = time.perf_counter()
    stream = make_train_stream(a["urls"], settings, fields=fields)
    built = time.perf_counter() - started
    batches = iter(stream)
    next(batches)
    first = time.perf_counter() - started
    worker = psutil.Process(*(p.pid for p in psutil.Process().children()[:workers]))
    cpu0, t0, n = sum(worker.cpu_times()[:2]), time.perf_counter(), 0
    while n < a["batches"] and (n < 2 or time.perf_counter() - t0 < a["seconds"]):
        next(batches)
        n += 1
    seconds = time.perf_counter() - t0
    cpu = sum(worker.cpu_times()[:2]) - cpu0
    memory = _rss(worker.pid)
    del batches
    return {
        "code": data_pipelines.__file__,
        "build_s": built,
        "first_batch_s": first,
        "timed_batches": n,
        "samples_per_s": n * 64 / seconds,
        "worker_cpu_us_per_sample": cpu / (n * 64) * 1e6,
        "worker": memory,
        "main": _rss(),
    }


def child_write_sidecar(a: dict[str, Any]) -> dict[str, Any]:
    """Write a sidecar of ``a["keys"]`` 9-digit keys: this format, or the old one."""
    import numpy as np
    import torch

    from vlp.profiling import peak_rss_growth

    n, path = a["keys"], a["path"]

    def write() -> None:
        if a["format"] == "old":  # one tensor per key, as vlp prior weights wrote them
            from safetensors.torch import save_file

            values = (torch.arange(n * ROW) % EXACT).float().view(n, ROW)
            save_file({f"{i:09d}": values[i].clone() for i in range(n)}, path, {"id": "bench"})
            return
        from data_pipelines.sidecar import SidecarWriter

        with SidecarWriter(path, {"id": "bench"}) as writer:
            for start in range(0, n, 1 << 16):
                stop = min(start + (1 << 16), n)
                keys = np.char.zfill(np.arange(start, stop).astype("U9"), 9).tolist()
                values = np.arange(start * ROW, stop * ROW) % EXACT
                writer.add(keys, values.astype(np.float32).reshape(-1, ROW))

    started = time.perf_counter()
    _, grown = peak_rss_growth(write)
    seconds = time.perf_counter() - started
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return {"write_s": seconds, "peak_rss_growth": grown, "bytes": os.path.getsize(path),
            "header_bytes": header}  # fmt: skip


def child_lookup(a: dict[str, Any]) -> dict[str, Any]:
    """Random present keys through ``SidecarField.lookup``, as a data worker does."""
    import numpy as np
    import torch

    from data_pipelines.batch_fields import SidecarField

    field = SidecarField("teacher", a["path"])
    keys = [f"{i:09d}" for i in np.random.default_rng(0).integers(0, a["keys"], a["lookups"])]
    before = _rss()
    started = time.perf_counter()
    first = field.lookup(keys[0])
    opened = time.perf_counter() - started
    started = time.perf_counter()
    for key in keys[1:]:
        value = field.lookup(key)
    seconds = time.perf_counter() - started
    row = int(keys[-1])
    expected = (np.arange(row * ROW, (row + 1) * ROW) % EXACT).astype(np.float32)
    assert torch.allclose(value, torch.from_numpy(expected)), (value, expected)
    assert first.shape == (ROW,)
    return {"first_lookup_s": opened, "lookup_us": seconds / (len(keys) - 1) * 1e6,
            "rss_before": before, "rss_after": _rss()}  # fmt: skip


def _deal_spec(shards: int, slots: int, seed: int = 0) -> Any:
    from data_pipelines.stream_plan import StreamSpec

    rng = random.Random(seed)
    return StreamSpec(
        urls=tuple(f"s3://bucket/laion400m/{i:06d}.tar" for i in range(shards)),
        weights=(1.0,) * shards, batch_size=256, seed=seed, rank=0,
        world_size=max(slots // WORKERS_PER_RANK, 1), workers=min(slots, WORKERS_PER_RANK),
        resampled=False, shuffle_buffer=1000, first_epoch=0, image_keys=("jpg",),
        text_key="txt", caption_field=None, extra_keys=(), draft_size=None,
        max_pixels=1 << 26, max_consecutive_errors=200, remote_timeout=60.0, remote_retries=3,
        sizes=tuple(rng.randint(9000, 10000) for _ in range(shards)),
    )  # fmt: skip


def child_deal(a: dict[str, Any]) -> dict[str, Any]:
    """Time one epoch's deal (cache cleared), a cached call and the fingerprint."""
    import hashlib

    from data_pipelines.stream_plan import _epoch_deal, epoch_quota

    spec = _deal_spec(a["shards"], a["slots"])
    _epoch_deal.cache_clear()
    started = time.perf_counter()
    shards, loads = _epoch_deal(spec, 0)
    seconds = time.perf_counter() - started
    calls = 200
    started = time.perf_counter()
    for _ in range(calls):
        epoch_quota(spec, 0)
    cached = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    spec.fingerprint()
    fingerprint = time.perf_counter() - started
    plan = hashlib.sha256(json.dumps([shards, loads]).encode()).hexdigest()[:16]
    urls = sys.getsizeof(spec.urls) + sum(sys.getsizeof(u) for u in spec.urls)
    return {"deal_s": seconds, "cached_call_us": cached * 1e6, "fingerprint_s": fingerprint,
            "plan_sha": plan, "url_tuple_bytes": urls}  # fmt: skip


def child_pca(a: dict[str, Any]) -> dict[str, Any]:
    """fit_pca on n x w features made chunk by chunk: streamed, or materialised first (old)."""
    import torch

    from launch.protoclip_teacher import fit_pca
    from vlp.profiling import peak_rss_growth

    torch.set_num_threads(1)
    n, width, chunk = a["n"], a["width"], 1 << 16

    def chunks() -> Any:
        for start in range(0, n, chunk):
            generator = torch.Generator().manual_seed(start)
            yield torch.randn(min(chunk, n - start), width, generator=generator)

    def fit() -> Any:
        if a["mode"] == "stream":
            return fit_pca(chunks(), a["dim"])
        features = torch.empty(n, width)  # what the old teacher held before its PCA
        for start, rows in zip(range(0, n, chunk), chunks(), strict=True):
            features[start : start + len(rows)] = rows
        return fit_pca(features, a["dim"])

    started = time.perf_counter()
    pca, grown = peak_rss_growth(fit)
    return {"seconds": time.perf_counter() - started, "peak_rss_growth": grown,
            "explained": pca.explained}  # fmt: skip


CHILDREN = {"stream": child_stream, "write_sidecar": child_write_sidecar,
            "lookup": child_lookup, "deal": child_deal, "pca": child_pca}  # fmt: skip


# ------------------------------------------------------------------ orchestration (parent side)


def run_child(tree: Path, kind: str, args: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run ``kind`` in a fresh process importing the code of ``tree``; its result dict."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", kind, json.dumps(args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{kind} {args} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def ensure_data(data: Path) -> dict[str, str]:
    """The real shards and the symlink folders (made once); folder per shard count."""
    from data_pipelines.synthetic import generate_samples
    from data_pipelines.write import write_shards

    real = data / "real"
    if not (real / "sizes.json").exists():
        write_shards(generate_samples(SAMPLES, seed=0), real, samples_per_shard=PER_SHARD,
                     overwrite=True)  # fmt: skip
    targets = sorted(str(p.resolve()) for p in real.glob("*.tar"))
    assert len(targets) == REAL_SHARDS, targets
    folders = {"10": str(real)}
    for count in LINKED:
        folder = data / f"links-{count}"
        sizes = folder / "sizes.json"
        if not sizes.exists() or len(json.loads(sizes.read_text())) != count:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            names = [f"shard-{i:06d}.tar" for i in range(count)]
            for i, name in enumerate(names):
                os.symlink(targets[i % REAL_SHARDS], folder / name)
            sizes.write_text(json.dumps(dict.fromkeys(names, PER_SHARD)))
        folders[str(count)] = str(folder)
    return folders


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of a stream configuration's measurements."""

    def med(get: Any) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "rounds": len(runs),
        "samples_per_s": med(lambda r: r["samples_per_s"]),
        "worker_cpu_us_per_sample": med(lambda r: r["worker_cpu_us_per_sample"]),
        "build_s": med(lambda r: r["build_s"]),
        "first_batch_s": med(lambda r: r["first_batch_s"]),
        "worker_rss": med(lambda r: r["worker"]["rss"]),
        "worker_uss": med(lambda r: r["worker"]["uss"]),
        "worker_rss_anon": med(lambda r: r["worker"]["rss_anon"]),
        "main_rss": med(lambda r: r["main"]["rss"]),
        "all_samples_per_s": [r["samples_per_s"] for r in runs],
        "timed_batches": [r["timed_batches"] for r in runs],
    }


def _ratios(pairs: list[dict[str, Any]], get: Any) -> list[float]:
    return [get(p["400000"]) / get(p["10"]) for p in pairs]


def _inproc_cpu(run: dict[str, Any]) -> float:
    """The pair member's in-process CPU time per sample (``run`` is the worker run's entry)."""
    return run["in_process"]["worker_cpu_us_per_sample"]


def goal_part(
    folders: dict[str, str], sidecars: dict[str, dict[str, Any]], opts: argparse.Namespace
) -> list[dict[str, Any]]:
    """The issue's goal, paired: 400,000 shards and the largest sidecar against 10 shards and
    the sidecar of their own samples, back to back in alternating order, ``--goal-rounds``
    times per mode; the ratios are per pair (so that load drifting between pairs cancels)."""
    side, rows = sidecars["today"], []
    for mode in opts.modes:
        pairs = []
        for round_ in range(opts.goal_rounds):
            configs = [("10", side["small"]), ("400000", side["large"])]
            pair: dict[str, Any] = {}
            for workers in (1, 0):  # a data worker, then in-process (CPU time of one process)
                for shards, sidecar in configs[:: 1 if round_ % 2 == 0 else -1]:
                    args = {"urls": folders[shards], "resampled": mode == "resampled",
                            "sidecar": sidecar, "batches": opts.batches, "seconds": opts.seconds,
                            "workers": workers}  # fmt: skip
                    result = run_child(ROOT, "stream", args)
                    if workers:
                        pair[shards] = result
                    else:
                        pair[shards]["in_process"] = result
            pairs.append(pair)
            print(f"  goal {mode} round {round_}: "
                  f"{pair['400000']['samples_per_s'] / pair['10']['samples_per_s']:.3f}, in-process CPU "
                  f"{_ratios([pair], _inproc_cpu)[0]:.3f}", flush=True)  # fmt: skip

        rate = _ratios(pairs, lambda r: r["samples_per_s"])
        cpu = _ratios(pairs, lambda r: r["worker_cpu_us_per_sample"])
        inproc = _ratios(pairs, _inproc_cpu)
        rows.append({"mode": mode, "pairs": pairs, "rate_ratios": rate, "cpu_ratios": cpu,
                     "rate_ratio": statistics.median(rate), "cpu_ratio": statistics.median(cpu),
                     "in_process_cpu_ratios": inproc, "in_process_cpu_ratio": statistics.median(inproc),
                     "first_batch_s": max(p["400000"]["first_batch_s"] for p in pairs),
                     "rss_ratio": statistics.median(_ratios(pairs, lambda r: r["worker"]["rss"]))})  # fmt: skip
    return rows


def stream_part(trees: dict[str, Path], folders: dict[str, str], sidecars: dict[str, dict[str, Any]],
                opts: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """Every stream configuration of every tree; today's over ``opts.rounds`` rounds."""
    configs = []
    for code, side in sidecars.items():
        small, large = side["small"], side["large"]
        for mode in opts.modes:
            resampled = mode == "resampled"
            for shards in ("10", *map(str, LINKED)):
                configs.append((code, shards, mode, "", None))
            configs.append((code, "10", mode, small, side["small_keys"]))
            if resampled or code == "today":
                configs.append((code, "400000", mode, large, side["large_keys"]))
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for round_ in range(opts.rounds):
        for code, shards, mode, sidecar, keys in configs[:: 1 if round_ % 2 == 0 else -1]:
            if code == "before" and round_ >= opts.before_rounds:
                continue
            args = {"urls": folders[shards], "resampled": mode == "resampled", "sidecar": sidecar,
                    "batches": opts.batches, "seconds": opts.seconds}  # fmt: skip
            result = run_child(trees[code], "stream", args)
            runs.setdefault((code, shards, mode, keys), []).append(result)
            print(f"  stream {code} {shards} shards {mode} sidecar {keys}: "
                  f"{result['samples_per_s']:.0f}/s, first {result['first_batch_s']:.1f} s",
                  flush=True)  # fmt: skip
    rows = []
    for (code, shards, mode, keys), results in runs.items():
        rows.append({"code": code, "shards": int(shards), "mode": mode, "sidecar_keys": keys,
                     **median_row(results)})  # fmt: skip
    for row in rows:  # against the 10-shard run of the same code, mode and field kinds
        base = next(r for r in rows if r["code"] == row["code"] and r["shards"] == 10
                    and r["mode"] == row["mode"] and bool(r["sidecar_keys"]) == bool(row["sidecar_keys"]))  # fmt: skip
        row["overhead_us_per_sample"] = 1e6 / row["samples_per_s"] - 1e6 / base["samples_per_s"]
        row["rate_vs_10"] = row["samples_per_s"] / base["samples_per_s"]
        row["cpu_overhead_us_per_sample"] = (
            row["worker_cpu_us_per_sample"] - base["worker_cpu_us_per_sample"]
        )
        row["rss_vs_10"] = row["worker_rss"] / base["worker_rss"]
        plain = next(r for r in rows if r["code"] == row["code"] and r["shards"] == 10
                     and r["mode"] == row["mode"] and not r["sidecar_keys"])  # fmt: skip
        row["rate_vs_plain_10"] = row["samples_per_s"] / plain["samples_per_s"]
    return rows


def sidecar_part(trees: dict[str, Path], data: Path, opts: argparse.Namespace,
                 measure: bool) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:  # fmt: skip
    """Write the sidecars (kept for the stream) and time lookups in a fresh process; without
    ``measure``, only write those that are missing."""
    sizes = {"today": (SAMPLES, *opts.sidecar_keys), "before": (SAMPLES, opts.old_sidecar_keys)}
    rows, paths = [], {}
    for code, counts in sizes.items():
        if code not in trees:
            continue
        fmt = "old" if code == "before" else "new"
        for keys in counts:
            path = str(data / f"sidecar-{fmt}-{keys}.safetensors")
            if not measure:
                if not os.path.exists(path):
                    run_child(
                        trees[code], "write_sidecar", {"keys": keys, "path": path, "format": fmt}
                    )
                continue
            row = {"code": code, "keys": keys,
                   **run_child(trees[code], "write_sidecar", {"keys": keys, "path": path, "format": fmt})}  # fmt: skip
            lookups = opts.old_lookups if fmt == "old" else opts.lookups
            row |= run_child(
                trees[code], "lookup", {"path": path, "keys": keys, "lookups": lookups}
            )
            print(f"  sidecar {code} {keys} keys: {row['bytes'] / MB:.1f} MB, "
                  f"{row['lookup_us']:.1f} us/lookup", flush=True)  # fmt: skip
            rows.append(row)
        paths[code] = {"small": str(data / f"sidecar-{fmt}-{SAMPLES}.safetensors"), "small_keys": SAMPLES,
                       "large": str(data / f"sidecar-{fmt}-{counts[-1]}.safetensors"), "large_keys": counts[-1]}  # fmt: skip
    return rows, paths


def tree_label(tree: Path) -> str:
    """The commit a tree holds, with ``+changes`` when its files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else "")


def startup_part(trees: dict[str, Path], folders: dict[str, str], opts: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """Seconds to build the stream and to its first batch at 400,000 shards, each tree and mode
    in turn over ``--rounds`` rounds (what every rank pays before its first step)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(opts.rounds):
        for code, tree in trees.items():
            for mode in opts.modes:
                args = {"urls": folders["400000"], "resampled": mode == "resampled",
                        "sidecar": "", "batches": 3, "seconds": 2.0}  # fmt: skip
                result = run_child(tree, "stream", args)
                runs.setdefault((code, mode), []).append(result)
                print(f"  startup {code} {mode}: build {result['build_s']:.1f} s, "
                      f"first batch {result['first_batch_s']:.1f} s", flush=True)  # fmt: skip
    return [{"code": code, "commit": tree_label(trees[code]), "mode": mode, "shards": 400_000,
             "build_s": statistics.median(r["build_s"] for r in results),
             "first_batch_s": statistics.median(r["first_batch_s"] for r in results),
             "all_first_batch_s": [r["first_batch_s"] for r in results],
             "load": os.getloadavg()} for (code, mode), results in runs.items()]  # fmt: skip


def deal_part(trees: dict[str, Path], opts: argparse.Namespace) -> list[dict[str, Any]]:
    """The deal at every (shards, slots); the old one extrapolated above the budget."""
    rows = []
    for code, tree in trees.items():
        measured = []
        for shards in LINKED:
            for slots in SLOTS:
                row: dict[str, Any] = {"code": code, "shards": shards, "slots": slots}
                if code == "before" and shards * slots > opts.old_deal_budget:
                    row["extrapolated"] = True
                else:
                    row |= run_child(tree, "deal", {"shards": shards, "slots": slots})
                    measured.append(row)
                    print(f"  deal {code} {shards} shards {slots} slots: {row['deal_s']:.3f} s",
                          flush=True)  # fmt: skip
                rows.append(row)
        per_unit = statistics.median(r["deal_s"] / (r["shards"] * r["slots"]) for r in measured)
        for row in rows:
            if row.get("extrapolated"):
                row["deal_s"] = per_unit * row["shards"] * row["slots"]
    today = {(r["shards"], r["slots"]): r for r in rows if r["code"] == "today"}
    for row in rows:
        if row["code"] == "before" and "plan_sha" in row:
            row["same_plan_as_today"] = (
                row["plan_sha"] == today[(row["shards"], row["slots"])]["plan_sha"]
            )
    return rows


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |")
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")


def report(results: dict[str, Any]) -> None:
    """The tables, as in RESULTS.md."""
    print_table("stream (1 worker, batch 64, 32 px; medians)",
                ["code", "shards", "mode", "sidecar keys", "samples/s", "vs 10 shards",
                 "overhead us/sample", "worker CPU us/sample", "build s", "first batch s",
                 "worker RSS MB", "vs 10", "worker USS MB"],
                [[r["code"], r["shards"], r["mode"], r["sidecar_keys"] or "", round(r["samples_per_s"]),
                  f"{r['rate_vs_10']:.2f}x", round(r["overhead_us_per_sample"]),
                  round(r["worker_cpu_us_per_sample"]), round(r["build_s"], 2), round(r["first_batch_s"], 2),
                  round(r["worker_rss"] / MB), f"{r['rss_vs_10']:.2f}x", round(r["worker_uss"] / MB)]
                 for r in results["stream"]])  # fmt: skip
    print_table("sidecar", ["code", "keys", "file MB", "header bytes", "write s", "write peak MB",
                            "first lookup ms", "lookup us", "RSS before MB", "after: + anon / + file MB"],
                [[r["code"], r["keys"], round(r["bytes"] / MB, 1), r["header_bytes"], round(r["write_s"], 1),
                  round(r["peak_rss_growth"] / MB), round(r["first_lookup_s"] * 1e3, 1), round(r["lookup_us"], 1),
                  round(r["rss_before"]["rss"] / MB),
                  f"+{(r['rss_after']['rss_anon'] - r['rss_before']['rss_anon']) / MB:.0f} / "
                  f"+{(r['rss_after']['rss_file'] - r['rss_before']['rss_file']) / MB:.0f}"]
                 for r in results["sidecar"]])  # fmt: skip
    print_table("deal (one epoch, all slots)", ["code", "shards", "slots", "deal s", "cached call us",
                                                "same plan"],
                [[r["code"], r["shards"], r["slots"], round(r["deal_s"], 3) if not r.get("extrapolated")
                  else f"~{r['deal_s']:.0f} (extrapolated)", round(r.get("cached_call_us", float("nan")), 1),
                  r.get("same_plan_as_today", "")] for r in results["deal"]])  # fmt: skip
    print_table("goal: 400,000 shards + largest sidecar / 10 shards + their own sidecar, per pair",
                ["mode", "pairs", "samples/s ratio, median [min, max]", "worker CPU/sample ratio",
                 "in-process CPU/sample ratio", "first batch s (max)", "worker RSS ratio"],
                [[r["mode"], len(r["pairs"]),
                  f"{r['rate_ratio']:.3f} [{min(r['rate_ratios']):.2f}, {max(r['rate_ratios']):.2f}]",
                  f"{r['cpu_ratio']:.3f} [{min(r['cpu_ratios']):.2f}, {max(r['cpu_ratios']):.2f}]",
                  f"{r['in_process_cpu_ratio']:.3f} [{min(r['in_process_cpu_ratios']):.2f}, "
                  f"{max(r['in_process_cpu_ratios']):.2f}]",
                  round(r["first_batch_s"], 1), f"{r['rss_ratio']:.2f}"] for r in results["goal"]])  # fmt: skip
    print_table("start-up at 400,000 shards (medians)", ["code", "commit", "mode", "build s",
                                                         "first batch s", "rounds"],
                [[r["code"], r["commit"], r["mode"], round(r["build_s"], 1), round(r["first_batch_s"], 1),
                  len(r["all_first_batch_s"])] for r in results["startup"]])  # fmt: skip
    print_table("teacher PCA", ["code", "n", "width", "peak RSS growth MB", "s"],
                [[r["code"], r["n"], r["width"], round(r["peak_rss_growth"] / MB), round(r["seconds"], 1)]
                 for r in results["pca"]])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=Path, help="a checkout of the old code (before rows)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "bench_scale")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--modes", nargs="+", default=["resampled", "epoch"],
                        choices=["resampled", "epoch"], help="stream modes")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="stream rounds, today's code")
    parser.add_argument("--before-rounds", type=int, default=1, help="stream rounds, old code")
    parser.add_argument("--goal-rounds", type=int, default=5, help="pairs per mode, goal part")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per stream run")
    parser.add_argument("--seconds", type=float, default=8.0, help="at most, timed per run")
    parser.add_argument("--sidecar-keys", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--old-sidecar-keys", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--old-lookups", type=int, default=100)
    parser.add_argument("--old-deal-budget", type=float, default=3e7, help="shards x slots")
    parser.add_argument("--pca-samples", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--pca-width", type=int, default=384)
    parser.add_argument("--keep", action="store_true", help="keep symlinks and sidecars")
    opts = parser.parse_args()
    if opts.child:
        print("RESULT " + json.dumps(CHILDREN[opts.child](json.loads(opts.child_args))))
        return
    trees = {"today": ROOT, **({"before": opts.before.resolve()} if opts.before else {})}
    opts.data = opts.data.resolve()
    opts.data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Parts not run this time keep their earlier results (so the parts can run one at a time).
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = results.setdefault("runs", [])
    runs.append({"parts": opts.parts, "modes": opts.modes, "trees": {k: str(v) for k, v in trees.items()},
                 "settings": {k: str(v) for k, v in vars(opts).items() if k[:5] != "child"},
                 "cpus": os.cpu_count(), "load_before": os.getloadavg(), "date": time.strftime("%F %T")})  # fmt: skip
    folders = ensure_data(opts.data)
    print(f"data ready in {time.perf_counter() - started:.0f} s", flush=True)
    if {"sidecar", "stream", "goal"} & set(opts.parts):
        rows, sidecars = sidecar_part(trees, opts.data, opts, measure="sidecar" in opts.parts)
        results["sidecar"] = rows or results.get("sidecar", [])
    if "stream" in opts.parts:
        kept = [r for r in results.get("stream", []) if r["mode"] not in opts.modes]
        results["stream"] = kept + stream_part(trees, folders, sidecars, opts)
    if "goal" in opts.parts:
        kept = [r for r in results.get("goal", []) if r["mode"] not in opts.modes]
        results["goal"] = kept + goal_part(folders, sidecars, opts)
    if "startup" in opts.parts:
        results["startup"] = startup_part(trees, folders, opts)
    if "deal" in opts.parts:
        results["deal"] = deal_part(trees, opts)
    if "pca" in opts.parts:
        results["pca"] = []
        for code, tree in trees.items():
            for n in opts.pca_samples:
                args = {"n": n, "width": opts.pca_width, "dim": 64,
                        "mode": "materialise" if code == "before" else "stream"}  # fmt: skip
                results["pca"].append({"code": code, **args, **run_child(tree, "pca", args)})
                print(
                    f"  pca {code} n={n}: {results['pca'][-1]['peak_rss_growth'] / MB:.0f} MB",
                    flush=True,
                )
    runs[-1]["load_after"] = os.getloadavg()
    runs[-1]["seconds"] = time.perf_counter() - started
    report(
        {"stream": [], "goal": [], "startup": [], "sidecar": [], "deal": [], "pca": [], **results}
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS} ({runs[-1]['seconds']:.0f} s)")
    if not opts.keep:
        for path in [*opts.data.glob("sidecar-*"), *opts.data.glob("links-*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
