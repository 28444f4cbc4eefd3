"""Loss memory, time and communication per rank: vlp's tiled ring core vs open_clip's ClipLoss.

Every configuration runs in a fresh set of ``--world`` gloo processes on the CPU (d = 512,
float32, threads = cores // world per process). Each rank builds its b = B/world unit features,
runs a small warm-up through the same loss (kernels, threads, process groups), then measures ONE
forward+backward of the loss: the growth of its peak RSS during the call
(``vlp.profiling.peak_rss_growth``: ``VmHWM`` after minus ``VmRSS`` before, reset through
``/proc/self/clear_refs``) and its wall time; the table shows the largest rank. Bytes are what a
rank sends: counted by vlp's collectives for vlp; for open_clip the payload of its all-gathers
(2·(N−1)·b·d·4 forward, the same again backward with ``gather_with_grad``), computed.

Sides: ``vlp G=g`` (``contrastive_loss`` with contrastive groups of g ranks; g = world is the
exact full-batch loss), ``open_clip local`` (``ClipLoss(local_loss=True,
gather_with_grad=True)``, exact, O(b·B)), ``open_clip default`` (O(B²) on every rank; run only
where it fits: ``--default-max``). Prints a table and writes
``benchmarks/results/contrastive_loss.json``.

    .venv/bin/python benchmarks/contrastive_loss.py [--batches 4096 8192 16384] [--world 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp.distributed import bytes_sent, contrastive_group, contrastive_loss, reset_bytes_sent
from vlp.profiling import peak_rss_growth

RESULTS = Path(__file__).parent / "results" / "contrastive_loss.json"
WIDTH = 512


def _loss_fn(side: str, group_size: int, rank: int, world: int) -> Any:
    if side == "vlp":
        group = contrastive_group(group_size)
        return lambda z, w, s: contrastive_loss(z, w, s, group=group)
    loss = open_clip.ClipLoss(
        local_loss=side == "open_clip local",
        gather_with_grad=side == "open_clip local",
        rank=rank,
        world_size=world,
    )
    return lambda z, w, s: loss(z, w, s)


def _features(rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(rows, WIDTH, generator=g), dim=-1).requires_grad_()
        for _ in range(2)
    ]


def _rank(rank: int, world: int, port: int, side: str, batch: int, group: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    loss_fn = _loss_fn(side, group, rank, world)
    scale = torch.tensor(14.0, requires_grad=True)
    loss_fn(*_features(32, seed=rank), scale).backward()  # warm-up
    z, w = _features(batch // world, seed=100 + rank)
    dist.barrier()
    reset_bytes_sent()

    def one_step() -> float:
        started = time.perf_counter()
        loss_fn(z, w, scale).backward()
        return time.perf_counter() - started

    seconds, grown = peak_rss_growth(one_step)
    sent = bytes_sent()
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps({"rss": grown, "s": seconds, "bytes": sent}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(side: str, batch: int, world: int, group: int) -> dict[str, Any]:
    """One configuration in a fresh set of processes; the largest rank's figures."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), side, batch, group, out), nprocs=world)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    b = batch // world
    if side == "vlp":
        sent = max(r["bytes"] for r in ranks)
    else:  # open_clip's all-gathers of both feature sets, computed
        sent = 2 * (world - 1) * b * WIDTH * 4 * (2 if side == "open_clip local" else 1)
    return {
        "side": side if side != "vlp" else f"vlp G={group}",
        "batch": batch,
        "world": world,
        "group_size": group,
        "peak_rss_growth_mb": max(r["rss"] for r in ranks) / 1e6,
        "seconds": max(r["s"] for r in ranks),
        "bytes_sent_per_rank_mb": sent / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--default-max", type=int, default=8192, help="largest B for default mode")
    args = parser.parse_args()
    groups = sorted({1, 2, args.world} & set(range(1, args.world + 1)))
    rows = []
    for batch in args.batches:
        sides = [("open_clip local", args.world)] + [("vlp", g) for g in reversed(groups)]
        if batch <= args.default_max:
            sides.insert(0, ("open_clip default", args.world))
        for side, group in sides:
            rows.append(measure(side, batch, args.world, group))
            row = rows[-1]
            print(
                f"B={batch:6d} {row['side']:18s} peak RSS growth {row['peak_rss_growth_mb']:8.1f} MB"
                f"  {row['seconds']:7.2f} s  sent {row['bytes_sent_per_rank_mb']:7.1f} MB/rank",
                flush=True,
            )
    summary = []
    for batch in args.batches:
        by_side = {r["side"]: r for r in rows if r["batch"] == batch}
        ours, anchor = by_side[f"vlp G={args.world}"], by_side["open_clip local"]
        summary.append(
            {
                "batch": batch,
                "memory_ratio_open_clip_local_over_vlp": anchor["peak_rss_growth_mb"]
                / max(ours["peak_rss_growth_mb"], 1e-9),
                "time_ratio_vlp_over_open_clip_local": ours["seconds"] / anchor["seconds"],
            }
        )
    print("\n   B   memory: open_clip local / vlp   time: vlp / open_clip local")
    for item in summary:
        print(
            f"{item['batch']:6d}   {item['memory_ratio_open_clip_local_over_vlp']:10.1f}x"
            f"   {item['time_ratio_vlp_over_open_clip_local']:10.2f}x"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "cpu_count": os.cpu_count(),
        "threads_per_rank": max(1, (os.cpu_count() or 1) // args.world),
        "width": WIDTH,
        "device": "cpu (gloo)",
    }
    RESULTS.write_text(
        json.dumps({"environment": environment, "rows": rows, "summary": summary}, indent=2) + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
