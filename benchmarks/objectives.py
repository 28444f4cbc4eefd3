"""The objectives table: every registered objective trained alike on the procedural dataset.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives.py [--steps 300] [--only NAME ...]

Each objective in ``vlp.objectives.list_objectives()`` is trained from its demo recipe
(:data:`RECIPES`) with the same steps, batch, seed, data worker count and image tower (the
demo's tiny ViT at 32 px), on the procedural shapes that ``vlp demo`` writes, by
:func:`launch.demo.run_demo`. Per objective it reports, on the held-out shards (seed 1, never
trained on):

- zero-shot acc1 (class prompts worded unlike the training text; chance 1/9);
- retrieval R@1 and R@5 both ways: image→text (``text_retrieval_recall@k``: per image, its own
  caption among the top k) and text→image (``image_retrieval_recall@k``); chance k/1000;
- linear-probe acc1: :func:`evals.tasks.linear_probe_task` on the checkpoint as
  :func:`evals.loading.load_model` loads it (with the objective's heads, as evaluation sees it),
  fitted on the training shards' image features, tested on the held-out ones;
- seconds per optimizer step (median over the ``train/samples_per_s`` log windows, the first
  window left out: it holds the stream's start) and that time relative to CLIP's;
- for a captioning model (CoCa), greedy BLEU-4 and CIDEr of its captions of the held-out images
  (:func:`evals.captioning.captioning_task`, ``min_len`` 2: many procedural captions are one to
  three tokens).

Rows are the registered objectives plus :data:`EXTRA_ROWS` (plain CoCa, PRIOR's baseline). PRIOR
needs its reference LM: :func:`prior_reference` trains it once, from
``prior_reference_demo.yaml`` on the same training shards, before the rows that name it.

Writes ``benchmarks/results/objectives.json``, ``benchmarks/results/objectives.png`` and its own
section of ``benchmarks/RESULTS.md`` (replaced in place on a re-run, other sections untouched).
A new objective adds its row by registering itself and adding its recipe to :data:`RECIPES`.
``--only NAME ...`` trains those objectives only and keeps the other rows of an existing
``objectives.json`` made with the same steps, batch and seed (the training is deterministic: a
re-run reproduces their metrics; their s/step, CLIP's included, are from the earlier session,
so name ``clip`` too for time ratios measured side by side).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.synthetic import CLASSNAMES  # noqa: E402

if TYPE_CHECKING:
    from evals.loading import LoadedModel

CONFIGS = ROOT / "launch" / "configs"
RECIPES: dict[str, tuple[Path, tuple[str, ...]]] = {
    "clip": (CONFIGS / "demo.yaml", ()),
    "siglip": (CONFIGS / "demo.yaml", ("objective.name=siglip",)),
    "convirt": (CONFIGS / "convirt_demo.yaml", ()),
    "pyramidclip": (CONFIGS / "pyramidclip_demo.yaml", ()),
    "protoclip": (CONFIGS / "protoclip_demo.yaml", ()),
    "prior": (CONFIGS / "prior_demo.yaml", ("objective.prior.reference={reference}",)),
}
"""Objective name -> (recipe yaml, overrides). The recipe must use the demo's image tower;
``{reference}`` in an override is the folder of :func:`prior_reference`."""
EXTRA_ROWS: dict[str, tuple[Path, tuple[str, ...]]] = {
    "coca": (CONFIGS / "prior_demo.yaml", ("objective.prior.reference=",)),
}
"""Row name -> (recipe, overrides) of rows that are not a registered objective's own: plain CoCa
is PRIOR without a reference LM (every caption token weighs 1)."""
NOT_IN_TABLE = {
    "prior_reference": "trains PRIOR's text-only reference LM, not an image-text model",
}
"""Registered objectives this table leaves out, and why (printed with the table)."""
NOTES: dict[str, str] = {
    "convirt": (
        "The ConVIRT demo trains its whole tiny random BERT (the paper freezes a pretrained "
        "BERT's bottom) on procedural reports whose every sampleable sentence names the shape. "
        "Before 2026-12-08 (tower frozen from layer 0 down, one or two filler sentences per "
        "report) its loss moved only from 4.16 (ln 64) to 4.06 in 600 steps and zero-shot was "
        "0.152. The objective itself is tested exact (tests/objectives/test_convirt.py); this "
        "row measures the demo recipe, not the loss."
    ),
    "pyramidclip": (
        "PyramidCLIP encodes three image inputs per sample (global and local views through the "
        "whole tower, and the ROI branch through f2 after a no-grad f1 pass over the whole "
        "image) and three texts, hence its time per step; its levels are compared in "
        '"PyramidCLIP levels" (benchmarks/pyramid_levels.py).'
    ),
    "prior": (
        "PRIOR and CoCa train a CoCa (the same ViT trunk with CoCa's attentional pooler, a text "
        "tower over the procedural captions' 192-piece tokenizer, a 2-layer caption decoder), "
        "contrastive weight 1 and caption weight 2; PRIOR's s/step includes its frozen "
        'reference LM\'s forward. Over 3 seeds with BLEU-4 and CIDEr: "PRIOR vs CoCa" '
        "(benchmarks/prior_vs_coca.py)."
    ),
    "protoclip": (
        "ProtoCLIP's s/step includes pass 1 (a no-grad forward of each 1,280-sample episode, "
        "once per 20 steps) and k-means; CLIP and ProtoCLIP side by side over 3 seeds, with "
        'the time per episode split, are in "ProtoCLIP vs CLIP" (benchmarks/protoclip_seeds.py).'
    ),
}
"""Measured explanations kept with the code, so that a re-run writes them again."""
REFERENCE = "clip"
COCA_POOLER = ("attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "output_tokens")
"""vision_cfg keys a CoCa adds to a ViT trunk (its attentional pooler and the image tokens)."""
DEFAULT_STEPS = 300
"""Half the demo recipes' 600 (whose CLIP reaches zero-shot 0.95), for half the time; pass
``--steps 600`` for the recipes' own length."""
HEADING = "## Objectives side by side"
COLUMNS = {  # JSON key -> table header
    "zeroshot_acc1": "zero-shot acc1",
    "i2t_r1": "I→T R@1",
    "i2t_r5": "I→T R@5",
    "t2i_r1": "T→I R@1",
    "t2i_r5": "T→I R@5",
    "linear_probe_acc1": "linear probe acc1",
}
CAPTIONING = {"bleu4": "BLEU-4", "cider": "CIDEr"}
"""Captioning columns, for the rows whose model captions (CoCa)."""
CHANCE = {"zeroshot_acc1": 1 / 9, "linear_probe_acc1": 1 / 9, "i2t_r1": 1e-3, "t2i_r1": 1e-3,
          "i2t_r5": 5e-3, "t2i_r5": 5e-3}  # fmt: skip


def now() -> str:
    """The time a table's runs started (rows of one invocation share it: ``measured``)."""
    return datetime.datetime.now().isoformat(timespec="minutes")


def recipes(objectives: Sequence[str]) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """The recipe of every objective, or SystemExit naming the ones without a recipe."""
    missing = [name for name in objectives if name not in RECIPES and name not in NOT_IN_TABLE]
    if missing:
        raise SystemExit(
            f"benchmarks/objectives.py: registered objective(s) {', '.join(missing)} have no "
            "recipe; add one per objective to RECIPES in benchmarks/objectives.py, e.g. "
            f"'{missing[0]}': (CONFIGS / '{missing[0]}_demo.yaml', ()) with the demo's "
            "tiny ViT image tower (vision_cfg of vlp-tiny-vit)"
        )
    if REFERENCE not in objectives:
        raise SystemExit(f"'{REFERENCE}' is not registered: it is the reference for step time")
    return {name: RECIPES[name] for name in objectives if name in RECIPES} | EXTRA_ROWS


def prior_reference(out: Path, data: Path) -> Path:
    """PRIOR's reference LM P_r, trained once into ``out`` from ``prior_reference_demo.yaml`` on
    the training shards in ``data`` (kept when ``out`` already holds a complete checkpoint)."""
    from launch.demo import run_demo
    from vlp.run_folder import checkpoints_dir, list_checkpoints

    if not list_checkpoints(checkpoints_dir(out)):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "data").exists():
            (out / "data").symlink_to(data.resolve(), target_is_directory=True)
        print(f"\n=== PRIOR's reference LM into {out}", flush=True)
        run_demo(out, ["data.workers=1", "eval.every=0"], CONFIGS / "prior_reference_demo.yaml")
    return out


def captioning_metrics(loaded: LoadedModel, heldout: Path) -> dict[str, float]:
    """Greedy BLEU-4 and CIDEr of a loaded checkpoint (:func:`evals.loading.load_model`) on the
    held-out shards."""
    from evals.captioning import captioning_task
    from evals.datasets import open_eval_set
    from evals.tasks import EncodeOptions

    model, preprocess, tokenizer, _ = loaded
    eval_set = open_eval_set(heldout, task="retrieval")
    result = captioning_task(
        model, preprocess, tokenizer, eval_set, min_len=2, options=EncodeOptions(batch_size=500)
    )
    return {"bleu4": float(result.metrics["bleu4"]), "cider": float(result.metrics["cider"])}


def seconds_per_step(metrics_file: Path, batch: int) -> float:
    """Median seconds per step over the logged throughput windows, the first one left out."""
    rates = [
        row["train/samples_per_s"]
        for row in map(json.loads, metrics_file.read_text().splitlines())
        if "train/samples_per_s" in row
    ]
    return batch / statistics.median(rates[1:] or rates)


def linear_probe_acc1(loaded: LoadedModel, train_dir: Path, heldout_dir: Path) -> float:
    """Probe acc1 of a loaded checkpoint (:func:`evals.loading.load_model`)."""
    from evals.datasets import open_eval_set
    from evals.tasks import EncodeOptions, linear_probe_task

    model, preprocess, _, _ = loaded
    sets = [
        open_eval_set(folder, classnames=CLASSNAMES, task="classification")
        for folder in (train_dir, heldout_dir)
    ]
    result = linear_probe_task(model, preprocess, *sets, options=EncodeOptions(batch_size=500))
    return float(result.metrics["lp_acc1"])


def run_objective(
    name: str,
    recipe: Path,
    overrides: Sequence[str],
    out: Path,
    data: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train ``name`` into ``out`` on the shared shards in ``data``; its row of the table."""
    from launch.demo import run_demo

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():  # run_demo reads the shards from OUT/data: share one copy
        (out / "data").symlink_to(data.resolve(), target_is_directory=True)
    common = [
        f"train.steps={args.steps}",
        f"data.batch_size={args.batch}",
        f"train.seed={args.seed}",
        "data.workers=1",
        f"optim.warmup_steps={min(50, args.steps // 6)}",  # the recipes' 50 from 300 steps on
        f"train.log_every={max(1, min(20, args.steps // 10))}",
        "train.checkpoint_every=0",  # the final checkpoint only: no save inside a timed window
    ]
    if any("{reference}" in override for override in overrides):
        reference = prior_reference(data.parent / "prior_reference", data)
        overrides = [override.format(reference=reference) for override in overrides]
    print(f"\n=== {name}: {recipe.relative_to(ROOT)} {' '.join(overrides)}", flush=True)
    summary = run_demo(out, [*overrides, *common], recipe)
    from evals.loading import load_model

    loaded = load_model(out)  # the newest checkpoint, with the objective's heads
    model_cfg = {"model": loaded.info.name, **loaded.info.model_cfg}
    probe = linear_probe_acc1(loaded, data / "train", data / "heldout")
    captions = captioning_metrics(loaded, data / "heldout") if "multimodal_cfg" in model_cfg else {}
    return {
        "objective": name,
        "recipe": str(recipe.relative_to(ROOT)),
        "overrides": list(overrides),
        "zeroshot_acc1": summary["acc1"],
        "i2t_r1": summary["text_retrieval_recall@1"],
        "i2t_r5": summary["text_retrieval_recall@5"],
        "t2i_r1": summary["image_retrieval_recall@1"],
        "t2i_r5": summary["image_retrieval_recall@5"],
        "linear_probe_acc1": probe,
        "seconds_per_step": seconds_per_step(out / "metrics.jsonl", args.batch),
        "train_seconds": summary["train_seconds"],
        "final_train_loss": summary["final_train_loss"],
        "load_average_after": os.getloadavg()[0],
        "measured": getattr(args, "started", None) or now(),
        "model_cfg": model_cfg,
        **captions,
    }


def kept_rows(
    args: argparse.Namespace, chosen: dict[str, tuple[Path, tuple[str, ...]]]
) -> dict[str, dict[str, Any]]:
    """With ``--only``: the rows of the existing ``objectives.json`` not to train again (all but
    ``--only``), or SystemExit when it was made with other settings."""
    unknown = [name for name in args.only if name not in chosen]
    if unknown:
        raise SystemExit(f"--only: no recipe for {', '.join(unknown)} (have: {', '.join(chosen)})")
    path = args.results / "objectives.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    settings = {k: getattr(args, k) for k in ("steps", "batch", "seed")}
    if any(saved.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"--only: {path} was not made with {settings}; run the whole table")
    rows = {row["objective"]: row for row in saved["rows"]}
    keep = set(chosen) - set(args.only)
    missing = sorted(keep - set(rows))
    if missing:
        raise SystemExit(f"--only: {path} has no row for {', '.join(missing)}; add them to --only")
    return {name: rows[name] for name in keep}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, date: str) -> str:
    """The RESULTS.md section: heading, how to read it, the command, the table."""
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/objectives.py"
    if args.steps != DEFAULT_STEPS:
        command += f" --steps {args.steps}"
    header = ["objective", "model", *COLUMNS.values(), *CAPTIONING.values(), "s/step",
              "time vs CLIP"]  # fmt: skip
    about = (
        f"Every registered objective from its demo recipe, {args.steps} steps, batch "
        f"{args.batch}, seed {args.seed}, 1 data worker, the same tiny ViT image tower (4 layers, "
        "width 128, patch 4, 32 px), on the procedural shapes; metrics on the 1,000 held-out "
        "images. Zero-shot and probe chance is 0.111 (9 classes), R@1/R@5 chance 0.001/0.005. "
        "I→T = image query, its caption among the top k texts; T→I the reverse. Retrieval is "
        "low by construction: a caption names colour, size and position each only 1 time in 5, "
        "so many of the 1,000 captions fit an image equally well. Time per step "
        "is the median over log windows on a shared machine: other jobs' load moves it (the "
        "JSON keeps the load average after each run). Read a row against the dashed chance "
        "levels in the PNG; the probe column says whether the image tower learned the classes "
        "even where the text side (zero-shot, retrieval) did not."
    )
    source = (
        f"`{command}` — {date}, 2-core CPU (shared), torch {args.torch_version}, "
        "`benchmarks/results/objectives.json`, `benchmarks/results/objectives.png`:"
    )
    lines = [
        HEADING,
        "",
        textwrap.fill(about, 100),
        "",
        textwrap.fill(source, 100),
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * (len(header) - 2),
    ]
    for row in rows:
        cells = [row["objective"], f"`{row['model_cfg']['model']}`"]
        cells += [f"{row[key]:.3f}" for key in COLUMNS]
        cells += [f"{row[key]:.3f}" if key in row else "—" for key in CAPTIONING]
        cells += [f"{row['seconds_per_step']:.2f}", f"{row['time_vs_clip']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = table_notes(rows) + [
        textwrap.fill(f"Not in the table: {name}, {why}.", 100, initial_indent="- ",
                      subsequent_indent="  ")
        for name, why in NOT_IN_TABLE.items()
    ]  # fmt: skip
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def table_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences for what the table cannot show: towers unlike CLIP's, and rows near chance."""
    reference = next(row for row in rows if row["objective"] == REFERENCE)
    notes = []
    when = reference.get("measured", "an earlier run")
    apart = [row["objective"] for row in rows if row.get("measured") != when]
    if apart:
        notes.append(
            f"s/step of {', '.join(apart)} comes from other runs than {REFERENCE}'s ({when}; "
            "kept by --only, see `measured` in the JSON): their time vs CLIP is not side by side."
        )
    for row in rows:
        name, cfg = row["objective"], row["model_cfg"]
        trunk = {k: v for k, v in cfg["vision_cfg"].items() if k not in COCA_POOLER}
        if trunk != reference["model_cfg"]["vision_cfg"]:
            notes.append(
                f"{name}'s image tower differs from {REFERENCE}'s: not a like-for-like row."
            )
        elif trunk != cfg["vision_cfg"]:
            notes.append(f"{name}'s image tower is {REFERENCE}'s with CoCa's attentional pooler.")
        text = cfg.get("text_cfg", {})
        if text != reference["model_cfg"].get("text_cfg", {}):
            tower = Path(text["hf_model_name"]).name if "hf_model_name" in text else "another"
            notes.append(
                f"{name} has its own text tower ({tower}): its time and text-side metrics "
                "include the tower, not only the objective."
            )
        if row["zeroshot_acc1"] < CHANCE["zeroshot_acc1"] + 0.05:
            notes.append(f"{name} is within 0.05 of chance at zero-shot.")
        if name in NOTES:
            notes.append(NOTES[name])
    return [textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ") for note in notes]


def write_section(path: Path, section: str, heading: str = HEADING) -> None:
    """Replace the section under ``heading`` in ``path`` (up to the next ``## ``), or append it."""
    text = path.read_text() if path.is_file() else ""
    start = text.find(heading + "\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    after = text.find("\n## ", start + len(heading))
    rest = text[after + 1 :] if after >= 0 else ""
    path.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def _grouped_bars(axes: Any, rows: list[dict[str, Any]], keys: Sequence[str], title: str) -> None:
    """One group of bars per metric in ``keys``, one bar per objective, chance dashed."""
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(keys))]
        bars = axes.bar(xs, [row[key] for key in keys], width, label=row["objective"])
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    for g, key in enumerate(keys):
        axes.hlines(CHANCE[key], g - 0.45, g + 0.45, colors="grey", linestyles="--")
    axes.set_xticks(range(len(keys)), [COLUMNS[key] for key in keys], fontsize=8)
    top = max(max(row[key] for row in rows for key in keys), max(CHANCE[k] for k in keys))
    axes.set_ylim(0, min(1.0, top * 1.2) if top < 0.8 else 1.08)
    axes.set_title(title, fontsize=10)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Classification and retrieval bars per objective (chance dashed), and step time vs CLIP;
    retrieval has its own scale, as its values are an order of magnitude smaller."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2))
    classes_ax, retrieval_ax, time_ax = figure.subplots(
        1, 3, gridspec_kw={"width_ratios": [2, 4, 1.6]}
    )
    classification = ["zeroshot_acc1", "linear_probe_acc1"]
    retrieval = [key for key in COLUMNS if key not in classification]
    _grouped_bars(classes_ax, rows, classification, "classification, held-out (dashed: chance)")
    _grouped_bars(retrieval_ax, rows, retrieval, "retrieval, 1,000 held-out pairs")
    retrieval_ax.legend(fontsize=8, loc="upper right")
    names = [row["objective"] for row in rows]
    ratios = [row["time_vs_clip"] for row in rows]
    bars = time_ax.bar(names, ratios, color="grey")
    time_ax.bar_label(bars, fmt="%.2f×", fontsize=8)
    time_ax.axhline(1.0, color="black", linewidth=0.8)
    time_ax.set_ylim(0, max(ratios) * 1.15)
    time_ax.set_title("time per step vs CLIP", fontsize=10)
    time_ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """Train every objective, then print and write the table, JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "objectives",
                        help="run folders (one per objective) and the shared shards")  # fmt: skip
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--only", nargs="+", default=None,
                        help="train these only; keep the other rows of objectives.json")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from launch.demo import write_demo_data
    from vlp.objectives import list_objectives

    args.torch_version = torch.__version__.split("+")[0]
    args.started = now()
    chosen = recipes(list_objectives())
    kept = kept_rows(args, chosen) if args.only else {}
    write_demo_data(args.out / "data")
    trained = {
        name: run_objective(name, recipe, overrides, args.out / name, args.out / "data", args)
        for name, (recipe, overrides) in chosen.items()
        if name not in kept
    }
    rows = [trained[name] if name in trained else kept[name] for name in chosen]
    reference = next(row for row in rows if row["objective"] == REFERENCE)
    for row in rows:
        row["time_vs_clip"] = row["seconds_per_step"] / reference["seconds_per_step"]
    date = datetime.date.today().isoformat()
    section = markdown(rows, args, date)
    print("\n" + section)
    args.results.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("steps", "batch", "seed")}
    machine = f"{os.cpu_count()}-core CPU, {platform.machine()}"
    report = {"date": date, "machine": machine, "torch": args.torch_version, **settings}
    report |= {"data_workers": 1, "rows": rows}
    (args.results / "objectives.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.results / "objectives.png")
    write_section(args.results_md, section)
    print(f"wrote {args.results / 'objectives.json'}, {args.results / 'objectives.png'}, "
          f"{args.results_md} ({HEADING[3:]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
