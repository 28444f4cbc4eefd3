"""`vlp demo`: the embedded default end to end, with nothing to download.

Writes procedural shapes as webdataset shards (training and held-out, different seeds), trains a
recipe on the CPU (``launch/configs/demo.yaml``, a tiny CLIP, by default; one ``*_demo.yaml`` per
objective), evaluates it with what judges its objective (``Objective.evaluations``): zero-shot
(eval templates worded unlike the training captions) and retrieval on the held-out images, their
captioning for a CoCa, nothing for a text-only LM; prints a table titled by objective and model
and writes results JSON and plots into the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.synthetic import CLASSNAMES, EVAL_TEMPLATES, generate_samples
from data_pipelines.write import write_shards
from evals.results import read_result
from launch.cli import main as cli_main
from launch.run import train
from vlp.config import load_config
from vlp.objectives.registry import objective_class

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
TRAIN_SAMPLES = 10_000
HELDOUT_SAMPLES = 1_000


def write_demo_data(data_dir: Path, *, image_size: int = 32) -> tuple[Path, Path]:
    """Training and held-out shards (seeds 0 and 1); reused when already complete."""
    train_dir, heldout_dir = data_dir / "train", data_dir / "heldout"
    for folder, count, seed in ((train_dir, TRAIN_SAMPLES, 0), (heldout_dir, HELDOUT_SAMPLES, 1)):
        sizes = folder / "sizes.json"
        if sizes.is_file() and sum(json.loads(sizes.read_text()).values()) == count:
            continue
        write_shards(
            generate_samples(count, seed=seed, image_size=image_size),
            folder,
            samples_per_shard=1000,
            overwrite=True,
            classnames=CLASSNAMES,
        )
    return train_dir, heldout_dir


def run_demo(
    out: str | Path = "runs/demo",
    overrides: Sequence[str] = (),
    config: str | Path = DEMO_CONFIG,
) -> dict[str, float]:
    """Run the demo recipe ``config`` (default: the tiny CLIP) into ``out`` on the procedural
    shards; returns the final metrics (also in ``results/demo.json``)."""
    out = Path(out)
    started = time.time()
    train_dir, heldout_dir = write_demo_data(out / "data")
    run_config = load_config(
        config,
        [
            f"data.train_shards={train_dir}",
            f"eval.zeroshot_shards={heldout_dir}",
            f"eval.classnames={json.dumps(CLASSNAMES)}",
            f"eval.templates={json.dumps(EVAL_TEMPLATES)}",
            f"train.out_dir={out}",
            "train.overwrite=true",  # the demo owns its folder: a second `make demo` starts over
            *overrides,
        ],
    )
    result = train(run_config)
    evaluations = objective_class(run_config.objective.name).evaluations
    metrics = {k.removeprefix("eval/heldout/"): v for k, v in result.eval_metrics.items()}
    if "captioning" in evaluations:
        metrics |= _captioning_metrics(out, heldout_dir, run_config.eval.batch_size)
    summary = {
        **metrics,
        "train_steps": result.step,
        "final_train_loss": result.last_losses.get("train/loss", float("nan")),
        "train_seconds": result.seconds,
        "total_seconds": time.time() - started,
    }
    (out / "results" / "demo.json").write_text(json.dumps(summary, indent=2))
    title = f"vlp demo — objective {run_config.objective.name}, model {run_config.model.name}"
    if evaluations:
        print_table(summary, out, f"{title}, on held-out procedural shapes")
    else:
        note = (
            "This objective trains no image-text towers, so nothing is evaluated on held-out\n"
            "images: final_train_loss, its next-token cross-entropy (nats), is its measure."
        )
        print_table(summary, out, f"{title}, on the procedural captions", note)
    return summary


def _captioning_metrics(out: Path, heldout_dir: Path, batch_size: int) -> dict[str, float]:
    """BLEU-4 and CIDEr of the run's captions of the held-out images (`vlp eval captioning`)."""
    results = out / "results"
    argv = ["eval", "captioning", "--model", str(out), "--dataset", str(heldout_dir)]
    if cli_main([*argv, "--out", str(results), "--batch-size", str(batch_size)]) != 0:
        raise RuntimeError(f"vlp {' '.join(argv)} failed (its error is above)")
    (path,) = results.glob("*_captioning.json")
    return {f"captioning_{k}": float(v) for k, v in read_result(path)["metrics"].items()}


def print_table(summary: dict[str, float], out: Path, title: str, note: str = "") -> None:
    """The demo's result table, titled by objective and model, a note on reading it, and
    where its files are."""
    print(f"\n{title}")
    print(f"{'metric':<34}{'value':>12}")
    print("-" * 46)
    for key, value in summary.items():
        print(f"{key:<34}{value:>12.4f}" if isinstance(value, float) else f"{key:<34}{value:>12}")
    if note:
        print(f"\n{note}")
    print(f"\nresults: {out / 'results'}\nplots:   {out / 'plots'}\nlog:     {out / 'train.log'}")
