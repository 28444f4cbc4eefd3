"""ProtoCLIP against CLIP at the same sample budget, over several seeds, with ProtoCLIP's time
per episode split into pass 1 (encoding), clustering and training.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/protoclip_seeds.py [--steps 300]
        [--seeds 0 1 2] [--parallel N] [--teacher] [--variants NAME ...]

The paper's headline is the linear probe (RN50, CC2.5M, batch 512: 49.41 → 55.22), so this
reports linear probe and zero-shot (and retrieval) on the held-out procedural shapes, through
``benchmarks/objectives.py``'s :func:`~objectives.run_objective`, for:

- ``clip``: the CLIP demo recipe (``demo.yaml``: the ``openclip`` crop 0.9–1, as the paper's
  CLIP baseline);
- ``protoclip (no prototype terms)``: the ProtoCLIP recipe with ``w_proto = w_ext = 0``: its
  'light' augmentation, its heads and its LiT episodes, but CLIP's loss alone, so that the
  prototype terms' own effect is the difference to the next row;
- ``protoclip``: ``protoclip_demo.yaml`` (64 prototypes, episodes of 1,280 samples, no external
  teacher);
- with ``--teacher``, also ``protoclip + teacher``: the same with the external teacher,
  all-MiniLM-L6-v2 embeddings of the captions reduced to 64 dimensions (``vlp protoclip
  teacher``, computed once here).

``--variants`` trains only the named variants (re-measuring the rows whose code changed; the
section and JSON then hold those rows alone).

Writes ``benchmarks/results/protoclip_seeds.json`` (runs as they end in
``protoclip_seeds_runs.jsonl``) and the "ProtoCLIP vs CLIP" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import objectives  # noqa: E402
import pyramid_levels  # noqa: E402

PROTOCLIP = objectives.CONFIGS / "protoclip_demo.yaml"
VARIANTS: dict[str, pyramid_levels.Variant] = {
    "clip": ("clip", objectives.CONFIGS / "demo.yaml", ()),
    "protoclip (no prototype terms)": (
        "protoclip",
        PROTOCLIP,
        ("objective.protoclip.w_proto=0", "objective.protoclip.w_ext=0"),
    ),
    "protoclip": ("protoclip", PROTOCLIP, ()),
}
METRICS = {"linear_probe_acc1": "linear probe acc1", "zeroshot_acc1": "zero-shot acc1",
           "i2t_r5": "I→T R@5", "t2i_r5": "T→I R@5", "seconds_per_step": "s/step"}  # fmt: skip
EPISODE_PARTS = ("encode_s", "cluster_s", "train_s")
HEADING = "## ProtoCLIP vs CLIP"


def episode_times(run_dir: Path) -> dict[str, float]:
    """Median seconds per prototype episode of pass 1 (``encode_s``), k-means (``cluster_s``)
    and pass 2 (``train_s``, which the next episode's record carries)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_index = {int(r["episode/index"]): r for r in records if "episode/index" in r}
    prototype = [i for i, r in by_index.items() if r["episode/phase"] == 1.0]
    times = {p: statistics.median(by_index[i][f"episode/{p}"] for i in prototype)
             for p in ("encode_s", "cluster_s")}  # fmt: skip
    trained = [by_index[i + 1]["episode/train_s"] for i in prototype if i + 1 in by_index]
    times["train_s"] = statistics.median(trained)
    return times


def markdown(table: list[dict[str, Any]], args: argparse.Namespace, machine: str) -> str:
    """The RESULTS.md section."""
    command = pyramid_levels.seeds_command("protoclip_seeds.py", args)
    command += " --teacher" if args.teacher else ""
    if list(args.variants) != list(VARIANTS):
        command += " --variants " + " ".join(f"'{name}'" for name in args.variants)
    about = (
        f"The same {args.steps} steps of batch {args.batch} (the same samples seen) on the "
        "procedural shapes, tiny ViT; metrics on the 1,000 held-out images, mean ± standard "
        f"deviation over seeds {args.seeds}. Variants: see the script's docstring. s/step "
        "includes ProtoCLIP's pass 1 and clustering (amortised over the episode). Chance: "
        "0.111 (acc1), 0.005 (R@5)."
    )
    lines = pyramid_levels.table_lines(HEADING, about, command, machine, "protoclip_seeds.json",
                                       table, METRICS)  # fmt: skip
    lines += ["", "Seconds per prototype episode (20 steps of 64), median over episodes and "
              "seeds: pass 1 (encode), k-means (cluster), pass 2 (train):", "",
              "| variant | " + " | ".join(EPISODE_PARTS) + " | (encode + cluster) / train |",
              "|---|" + "---:|" * (len(EPISODE_PARTS) + 1)]  # fmt: skip
    for entry in table:
        if "train_s" in entry:
            extra = (entry["encode_s"] + entry["cluster_s"]) / entry["train_s"]
            cells = [f"{entry[p]:.2f}" for p in EPISODE_PARTS] + [f"{extra:.2f}"]
            lines.append(f"| {entry['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: the seeds scripts' options, ``--teacher`` and ``--variants``."""
    parser = pyramid_levels.seeds_parser(__doc__.splitlines()[0], "protoclip_seeds")
    parser.add_argument("--teacher", action="store_true", help="add the external-teacher row")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="train only these variants")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train every variant for every seed, then print and write the table and JSON."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from launch.demo import write_demo_data
    from launch.protoclip_teacher import DEFAULT_NAME, write_teacher_sidecar

    variants = {name: VARIANTS[name] for name in args.variants}
    if args.teacher:
        train_dir, _ = write_demo_data(args.out / "data")
        teacher = train_dir / DEFAULT_NAME
        if not teacher.is_file():
            write_teacher_sidecar(str(train_dir), teacher, dim=64)
        with_teacher = (f"objective.protoclip.teacher={teacher}",)
        variants["protoclip + teacher"] = ("protoclip", PROTOCLIP, with_teacher)
    runs_file = args.results / "protoclip_seeds_runs.jsonl"
    rows = pyramid_levels.run_variants(variants, args, runs_file)
    for row in rows:
        if variants[row["variant"]][0] == "protoclip":
            row |= episode_times(args.out / f"{row['variant']}-{row['seed']}")
    table = pyramid_levels.summarise(rows, list(variants), list(METRICS))
    for entry in table:
        runs = [row for row in rows if row["variant"] == entry["variant"]]
        for part in EPISODE_PARTS:
            if all(part in row for row in runs):
                entry[part] = statistics.median(row[part] for row in runs)
    section = markdown(table, args, pyramid_levels.machine_line())
    pyramid_levels.publish("protoclip_seeds.json", HEADING, section, table, rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
