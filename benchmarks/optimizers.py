"""The optimizers of ``optim.name`` side by side: state bytes, time per step, accuracy over
seeds, and a loss-spike experiment.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/optimizers.py [--steps 300] [--seeds 0 1 2]
        [--spike-steps 200] [--skip-accuracy]

- **State bytes**: the optimizer state after one step (every gradient zero: the state exists,
  nothing is trained) of the demo model (``vlp-tiny-vit``) and of open_clip's ViT-B/32, built
  from scratch; bytes per trainable parameter and in total (bitsandbytes' quantisation maps,
  one shared 1 KiB pair, not counted).
- **Time per step**: forward, backward and optimizer step of the demo model on one batch of 64
  (median of 8 steps after 2 warm-up steps, in this process), and the optimizer step alone.
- **Accuracy**: the CLIP demo recipe with each optimizer, ``--steps`` steps per seed, zero-shot
  and linear probe on the held-out shapes (:func:`pyramid_levels.run_variants`, the same runs as
  the other seeds tables).
- **Loss spikes**: the demo at twice its lr (2e-3), β2 = 0.999 and no gradient clipping, AdamW
  against StableAdamW, in two processes of one thread. Wortsman et al. trace spikes to a second
  moment that is out of date (a large β2 averages over a long past): a large β2 provokes them;
  the loss of every step goes to ``optimizers_spikes.png``.

Writes ``benchmarks/results/optimizers.json`` and the "Optimizers" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import objectives  # noqa: E402
import pyramid_levels  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vlp.config import OPTIMIZERS, OptimConfig  # noqa: E402
from vlp.training.optim import create_optimizer  # noqa: E402

HEADING = "## Optimizers"
DEMO = objectives.CONFIGS / "demo.yaml"
SPIKE = {"optim.lr": "0.002", "optim.beta2": "0.999", "optim.grad_clip": "null"}
"""The loss-spike setting (overrides of the demo recipe)."""
SPIKE_JUMP = 0.3
"""A step's loss counts as a spike when it exceeds the median of the 10 before it by this many
nats (the demo's step-to-step noise is ~0.15 nats around a loss of ~4)."""


def state_bytes(model: nn.Module, name: str) -> dict[str, float]:
    """Bytes of ``name``'s state after one step of zero gradients, in total and per parameter,
    and the parameters whose moments are 8-bit."""
    optimizer = create_optimizer(model, OptimConfig(name=name))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    total = eight_bit = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and not key.startswith("qmap"):
                total += value.numel() * value.element_size()
        if state.get("state1", torch.empty(0)).dtype == torch.uint8:
            eight_bit += param.numel()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del optimizer
    model.zero_grad(set_to_none=True)
    gc.collect()
    return {"bytes": total, "bytes_per_param": total / params, "params": params,
            "eight_bit_fraction": eight_bit / params}  # fmt: skip


def step_times(name: str, batch: int = 64, steps: int = 8) -> dict[str, float]:
    """Median seconds of a whole training step and of the optimizer step alone (demo model)."""
    from open_clip.loss import ClipLoss

    from vlp.models import create_model

    torch.manual_seed(0)
    model, *_ = create_model("vlp-tiny-vit")
    optimizer = create_optimizer(model, OptimConfig(name=name))
    images = torch.randn(batch, 3, 32, 32)
    texts = torch.randint(1, 49407, (batch, 32))
    loss_fn = ClipLoss()
    whole, alone = [], []
    for i in range(steps + 2):
        started = time.perf_counter()
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        before_step = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            whole.append(time.perf_counter() - started)
            alone.append(time.perf_counter() - before_step)
    return {"step_s": statistics.median(whole), "optimizer_step_s": statistics.median(alone)}


def memory_and_time(names: list[str]) -> dict[str, dict[str, Any]]:
    """State bytes for the demo model and ViT-B/32, and the demo's step times, per optimizer."""
    import open_clip

    from vlp.models import create_model

    demo, *_ = create_model("vlp-tiny-vit")
    vit_b32 = open_clip.create_model("ViT-B-32")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"state and time: {name}", flush=True)
        rows[name] = {"demo_state": state_bytes(demo, name),
                      "vit_b32_state": state_bytes(vit_b32, name), **step_times(name)}  # fmt: skip
    return rows


def spikes(losses: list[float]) -> list[int]:
    """Steps (from 1) whose loss exceeds the median of the 10 before by :data:`SPIKE_JUMP`."""
    return [
        i + 1
        for i in range(10, len(losses))
        if losses[i] > statistics.median(losses[i - 10 : i]) + SPIKE_JUMP
    ]


def spike_run(name: str, data: Path, out: Path, steps: int) -> dict[str, Any]:
    """The demo at :data:`SPIKE` with optimizer ``name`` (one torch thread): loss per step,
    spikes, the final zero-shot accuracy."""
    from launch.demo import run_demo

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():  # run_demo reads the shards from OUT/data: share one copy
        (out / "data").symlink_to(data.resolve(), target_is_directory=True)
    overrides = [f"{k}={v}" for k, v in SPIKE.items()] + [
        f"optim.name={name}", f"train.steps={steps}", "train.log_every=1", "train.threads=1",
        "train.checkpoint_every=0", "optim.warmup_steps=10", "data.workers=1",
    ]  # fmt: skip
    summary = run_demo(out, overrides, DEMO)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    return {"losses": losses, "spikes": spikes(losses), "zeroshot_acc1": summary["acc1"],
            "final_train_loss": summary["final_train_loss"]}  # fmt: skip


def spike_runs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """AdamW and StableAdamW at :data:`SPIKE`, side by side (two processes)."""
    from launch.demo import write_demo_data

    data = args.out / "data"
    write_demo_data(data)
    names = ("adamw", "stable_adamw")
    with ProcessPoolExecutor(len(names), mp_context=get_context("spawn")) as pool:
        futures = {
            name: pool.submit(spike_run, name, data, args.out / f"spike-{name}", args.spike_steps)
            for name in names
        }
        return {name: future.result() for name, future in futures.items()}


def plot_spikes(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Loss per step of each spike run, spikes marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    for name, run in runs.items():
        steps = range(1, len(run["losses"]) + 1)
        (line,) = axes.plot(steps, run["losses"], label=f"{name} ({len(run['spikes'])} spikes)")
        marked = [run["losses"][s - 1] for s in run["spikes"]]
        axes.scatter(run["spikes"], marked, color=line.get_color(), marker="x")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    settings = ", ".join(f"{k.removeprefix('optim.')}={v}" for k, v in SPIKE.items())
    axes.set_title(f"demo CLIP, {settings}\nx: loss > median of the previous 10 + {SPIKE_JUMP}")
    axes.legend()
    figure.tight_layout()
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The RESULTS.md section: state and time table, accuracy table, spike runs."""
    names = list(report["memory_and_time"])
    adamw = report["memory_and_time"]["adamw"]
    lines = [HEADING, "", textwrap.fill(
        "State after one step (nothing trained) of the demo model (`vlp-tiny-vit`, 8.0 M "
        "parameters, 6.3 M of them the token embedding) and of open_clip's ViT-B/32 (151 M); "
        "time per step of the demo model, batch 64, in one process (median of 8). "
        f"{report['machine']}.", 100), "",
        "| optim.name | demo state | bytes/param | × AdamW | ViT-B/32 state | bytes/param | "
        "× AdamW | 8-bit share | step (s) | optimizer step (s) |",
        "|---|" + "---:|" * 9]  # fmt: skip
    for name in names:
        row = report["memory_and_time"][name]
        demo, vit = row["demo_state"], row["vit_b32_state"]
        lines.append(
            f"| {name} | {demo['bytes'] / 2**20:.1f} MiB | {demo['bytes_per_param']:.2f} | "
            f"{demo['bytes'] / adamw['demo_state']['bytes']:.3f} | {vit['bytes'] / 2**20:.0f} MiB"
            f" | {vit['bytes_per_param']:.2f} | {vit['bytes'] / adamw['vit_b32_state']['bytes']:.3f}"
            f" | {vit['eight_bit_fraction']:.3f} | {row['step_s']:.3f} | "
            f"{row['optimizer_step_s']:.3f} |"
        )
    if report.get("accuracy"):
        about = (
            f"The CLIP demo recipe with each optimizer, {args.steps} steps of batch 64 (the "
            f"recipe's own is 600), seeds {args.seeds}; held-out procedural shapes, mean ± "
            "standard deviation over seeds; chance 0.111. s/step is the loop's median, on a "
            "shared 2-core machine."
        )
        lines += ["", *pyramid_levels.table_lines(
            "", about, pyramid_levels.seeds_command("optimizers.py", args), report["machine"],
            "optimizers.json", report["accuracy"], ACCURACY)[2:]]  # fmt: skip
    spike = report["spikes"]
    lines += ["", textwrap.fill(
        f"Loss spikes: the demo for {args.spike_steps} steps at "
        + ", ".join(f"`{k}={v}`" for k, v in SPIKE.items())
        + " (`benchmarks/results/optimizers_spikes.png`); a spike is a step whose loss exceeds "
        f"the median of the 10 before it by {SPIKE_JUMP} nats.", 100), "",
        "| optim.name | spikes (steps) | final train loss | zero-shot acc1 |", "|---|---|---:|---:|"]  # fmt: skip
    for name, run in spike.items():
        steps = ", ".join(map(str, run["spikes"])) or "none"
        lines.append(f"| {name} | {len(run['spikes'])} ({steps}) | "
                     f"{run['final_train_loss']:.3f} | {run['zeroshot_acc1']:.3f} |")  # fmt: skip
    return "\n".join([*lines, "", *findings(report)]) + "\n"


def findings(report: dict[str, Any]) -> list[str]:
    """What the tables show, computed from them (so that a re-run says it again)."""
    state = report["memory_and_time"]
    adamw = state["adamw"]
    notes = []
    for name in ("adamw8bit", "stable_adamw8bit"):
        ratio = state[name]["vit_b32_state"]["bytes"] / adamw["vit_b32_state"]["bytes"]
        slower = state[name]["step_s"] / adamw["step_s"]
        notes.append(
            f"{name}: ViT-B/32 state {ratio:.3f}× AdamW's (goal ≤ 0.3×: "
            f"{'met' if ratio <= 0.3 else 'missed'}); a demo step takes {slower:.2f}× AdamW's "
            "on this CPU (bitsandbytes' CPU path dequantises and quantises every step)."
        )
    rows = {row["variant"]: row for row in report.get("accuracy", [])}
    if rows:
        for key, label in (("zeroshot_acc1", "zero-shot"), ("linear_probe_acc1", "probe")):
            spread = max(row[f"{key}_std"] for row in rows.values())
            gaps = {n: row[key] - rows["adamw"][key] for n, row in rows.items() if n != "adamw"}
            within = [n for n, gap in gaps.items() if abs(gap) <= spread]
            notes.append(
                f"{label} acc1 against AdamW: "
                + ", ".join(f"{n} {gap:+.3f}" for n, gap in gaps.items())
                + f"; the largest seed standard deviation is {spread:.3f}, so "
                + (
                    "every optimizer is within the seeds' spread"
                    if len(within) == len(gaps)
                    else f"{', '.join(n for n in gaps if n not in within)} fall outside it"
                )
                + "."
            )
    spike = report["spikes"]
    counts = {name: len(run["spikes"]) for name, run in spike.items()}
    note = (
        f"Spikes: AdamW {counts['adamw']}, StableAdamW {counts['stable_adamw']} in "
        f"{len(spike['adamw']['losses'])} steps."
    )
    if counts["adamw"] > counts["stable_adamw"]:
        note += (
            " In the PNG, AdamW's spike sends the loss back to the plateau of uniform logits "
            "(4.16) for a while; StableAdamW's clipped lr keeps it learning. One seed per "
            "optimizer: an illustration of the claim, not a measurement of its rate."
        )
    elif counts["adamw"] == 0:
        note += " This setting provokes none in AdamW, so it cannot show StableAdamW's claim here."
    notes.append(note)
    return [textwrap.fill(n, 100, initial_indent="- ", subsequent_indent="  ") for n in notes]


ACCURACY = {"zeroshot_acc1": "zero-shot acc1", "linear_probe_acc1": "linear probe acc1",
            "seconds_per_step": "s/step"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Measure, then print the section and write the JSON, the PNG and RESULTS.md."""
    parser = pyramid_levels.seeds_parser(__doc__.splitlines()[0], "bench_optimizers")
    parser.add_argument("--spike-steps", type=int, default=200)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    report: dict[str, Any] = {
        "machine": pyramid_levels.machine_line(), "date": datetime.date.today().isoformat(),
        "steps": args.steps, "seeds": args.seeds, "spike_steps": args.spike_steps,
        "load_average_before": os.getloadavg()[0],
        "memory_and_time": memory_and_time(list(OPTIMIZERS)),
    }  # fmt: skip
    report["spikes"] = spike_runs(args)
    plot_spikes(report["spikes"], args.results / "optimizers_spikes.png")
    if not args.skip_accuracy:
        threads = ("train.threads=1",) if args.parallel > 1 else ()  # the runs share the cores
        variants = {name: ("clip", DEMO, (f"optim.name={name}", *threads)) for name in OPTIMIZERS}
        rows = pyramid_levels.run_variants(variants, args, args.out / "accuracy_runs.jsonl")
        report["accuracy"] = pyramid_levels.summarise(rows, list(OPTIMIZERS), ACCURACY)
        report["accuracy_runs"] = rows
    report["seconds"] = time.time() - started
    section = markdown(report, args)
    print("\n" + section)
    (args.results / "optimizers.json").write_text(json.dumps(report, indent=2) + "\n")
    objectives.write_section(args.results_md, section, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
