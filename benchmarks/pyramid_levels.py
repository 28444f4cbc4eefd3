"""PyramidCLIP's levels, ablated: CLIP on (global, caption), peer level only, + global cross
level, + local cross level (the full objective), each over several seeds.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pyramid_levels.py [--steps 300] [--seeds 0 1 2]
        [--parallel N]

Every variant trains from ``launch/configs/pyramidclip_demo.yaml`` with the same steps, batch and
data as ``benchmarks/objectives.py`` (whose :func:`~objectives.run_objective` runs each one and
measures zero-shot, retrieval, linear probe and time per step on the held-out shards). The
variants differ only in the loss weights (λ, μ; peer weight 1−λ−μ):

- ``clip (ablation)``: ``clip_only``, symmetric InfoNCE on (global view, caption), α = 0.2;
- ``peer``: λ = μ = 0 (L_GS + L_LT);
- ``peer + global cross``: λ = 1/3, μ = 0 (+ L_GA + L_RS);
- ``full``: λ = μ = 1/3 (+ L_LA + L_RT), the paper's.

``--parallel N`` trains N runs at once (one process each; for a machine with many cores: the
time per step is then that of N runs sharing it). Prints mean ± standard deviation over the
seeds, writes ``benchmarks/results/pyramid_levels.json`` (and each run as it ends into
``pyramid_levels_runs.jsonl``) and the "PyramidCLIP levels" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import textwrap
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import objectives  # noqa: E402

RECIPE = objectives.CONFIGS / "pyramidclip_demo.yaml"
THIRD = "0.3333333333333333"
VARIANTS: dict[str, tuple[str, ...]] = {
    "clip (ablation)": ("objective.pyramidclip.clip_only=true",),
    "peer": ("objective.pyramidclip.lam=0", "objective.pyramidclip.mu=0"),
    "peer + global cross": (f"objective.pyramidclip.lam={THIRD}", "objective.pyramidclip.mu=0"),
    "full": (f"objective.pyramidclip.lam={THIRD}", f"objective.pyramidclip.mu={THIRD}"),
}
"""Variant -> overrides of the PyramidCLIP demo recipe."""
METRICS = {"zeroshot_acc1": "zero-shot acc1", "linear_probe_acc1": "linear probe acc1",
           "i2t_r5": "I→T R@5", "t2i_r5": "T→I R@5", "seconds_per_step": "s/step"}  # fmt: skip
HEADING = "## PyramidCLIP levels (ablation)"


Variant = tuple[str, Path, tuple[str, ...]]
"""(objective name, recipe, overrides)."""


def _run(job: tuple[str, Variant, int, Path, argparse.Namespace]) -> dict[str, Any]:
    name, (objective, recipe, overrides), seed, out, args = job
    # a spawned worker inherits the spawn start method, and the demo's evaluation DataLoader
    # cannot pickle its data set for it: start its processes as a `vlp` command would (fork)
    multiprocessing.set_start_method("fork", force=True)
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    row = objectives.run_objective(
        objective, recipe, overrides, out / f"{name}-{seed}", out / "data", run_args
    )
    return {"variant": name, "seed": seed, **row}


def run_variants(
    variants: dict[str, Variant], args: argparse.Namespace, runs_file: Path
) -> list[dict[str, Any]]:
    """Train every variant for every seed of ``args.seeds`` (``args.parallel`` at once) on the
    demo's shards in ``args.out``; the rows, each also appended to ``runs_file`` as it ends."""
    from launch.demo import write_demo_data

    write_demo_data(args.out / "data")
    # seed by seed: a run cut short still compares every variant on the same seeds
    jobs = [(name, v, seed, args.out, args) for seed in args.seeds for name, v in variants.items()]
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    runs_file.write_text("")
    rows = []
    with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn")) as pool:
        for done in as_completed([pool.submit(_run, job) for job in jobs]):
            rows.append(done.result())
            with runs_file.open("a") as runs:
                runs.write(json.dumps(rows[-1]) + "\n")
    return rows


def machine_line() -> str:
    """Cores, architecture, accelerator and torch version, for a results table."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{os.cpu_count()}-core {platform.machine()}, {device}, torch {torch.__version__}"


def summarise(
    rows: list[dict[str, Any]], variants: Sequence[str], metrics: Sequence[str] = tuple(METRICS)
) -> list[dict[str, Any]]:
    """Per variant: mean and standard deviation (0 for one seed) of every metric."""
    table = []
    for variant in variants:
        runs = [row for row in rows if row["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "seeds": [row["seed"] for row in runs]}
        for key in metrics:
            values = [row[key] for row in runs]
            entry[key] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def markdown(table: list[dict[str, Any]], args: argparse.Namespace, machine: str) -> str:
    """The RESULTS.md section."""
    about = (
        f"PyramidCLIP's demo recipe (tiny ViT, f2 = its last 2 blocks, regions pooled from f1), "
        f"{args.steps} steps, batch {args.batch}, on the procedural shapes; metrics on the 1,000 "
        f"held-out images, mean ± standard deviation over seeds {args.seeds}. Variants differ "
        "only in the loss weights (see the script's docstring). Chance: 0.111 (acc1), 0.005 "
        "(R@5)."
    )
    lines = table_lines(HEADING, about, seeds_command("pyramid_levels.py", args), machine,
                        "pyramid_levels.json", table, METRICS)  # fmt: skip
    return "\n".join(lines) + "\n"


def seeds_command(script: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a seeds table."""
    command = f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/{script}"
    command += f" --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
    return command + (f" --parallel {args.parallel}" if args.parallel > 1 else "")


def table_lines(
    heading: str, about: str, command: str, machine: str, json_name: str,
    table: list[dict[str, Any]], metrics: dict[str, str],
) -> list[str]:  # fmt: skip
    """A seeds section: heading, what it is, the command, and mean ± std per variant."""
    lines = [heading, "", textwrap.fill(about, 100), "",
             textwrap.fill(f"`{command}` — {datetime.date.today().isoformat()}, {machine}, "
                           f"`benchmarks/results/{json_name}`:", 100), "",
             "| variant | " + " | ".join(metrics.values()) + " |",
             "|---|" + "---:|" * len(metrics)]  # fmt: skip
    for entry in table:
        cells = [f"{entry[k]:.3f} ± {entry[f'{k}_std']:.3f}" for k in metrics]
        lines.append(f"| {entry['variant']} | " + " | ".join(cells) + " |")
    return lines


def seeds_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The options every seeds benchmark takes (runs into ``runs/<out>``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=objectives.DEFAULT_STEPS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / out)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train every variant for every seed, then print and write the table and JSON."""
    args = seeds_parser(__doc__.splitlines()[0], "pyramid_levels").parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    variants = {name: ("pyramidclip", RECIPE, o) for name, o in VARIANTS.items()}
    rows = run_variants(variants, args, args.results / "pyramid_levels_runs.jsonl")
    machine = machine_line()
    table = summarise(rows, list(VARIANTS))
    publish("pyramid_levels.json", HEADING, markdown(table, args, machine), table, rows, args)
    return 0


def publish(
    json_name: str, heading: str, section: str, table: list[dict[str, Any]],
    rows: list[dict[str, Any]], args: argparse.Namespace,
) -> None:  # fmt: skip
    """Print a seeds section, write its JSON (settings, table, every run) into ``args.results``
    and replace its section of ``args.results_md``."""
    print("\n" + section)
    report = {"machine": machine_line(), "steps": args.steps, "batch": args.batch,
              "seeds": args.seeds, "parallel": args.parallel, "table": table, "runs": rows}  # fmt: skip
    (args.results / json_name).write_text(json.dumps(report, indent=2) + "\n")
    objectives.write_section(args.results_md, section, heading)


if __name__ == "__main__":
    raise SystemExit(main())
