"""Single-process training runs end to end: exact resume, and eval datasets inside training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.run import train
from vlp.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _config(shards: Path, out: Path, **extra: object):  # type: ignore[no-untyped-def]
    values = {
        "data.train_shards": shards,
        "data.batch_size": 8,
        "data.workers": 2,
        "data.prefetch_factor": 3,
        "data.shuffle_buffer": 20,
        "train.steps": 5,
        "train.log_every": 1,
        "train.checkpoint_every": 3,
        "train.keep_checkpoints": 2,
        "train.out_dir": out,
        "optim.warmup_steps": 1,
        **extra,
    }
    overrides = [f"{k}={v}" for k, v in values.items()]
    return load_config(ROOT / "launch" / "configs" / "demo.yaml", overrides)


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.parametrize("resampled", [True, False])
def test_resume_from_step_3_of_5_repeats_steps_4_and_5_exactly(tmp_path: Path, resampled: bool):
    """Step 3 is not a multiple of the 2 workers, and each worker has 3 batches prefetched
    that the first run never consumed; epoch mode crosses an epoch (4 batches per epoch)."""
    shards = tmp_path / "shards"
    write_shards(generate_samples(40, seed=0), shards, samples_per_shard=5)
    whole = tmp_path / "whole"
    train(_config(shards, whole, **{"data.resampled": resampled}))
    checkpoint = whole / "checkpoints" / "step_00000003"
    assert (checkpoint / "data_rank0.json").is_file()
    resumed = tmp_path / "resumed"
    train(_config(shards, resumed, **{"data.resampled": resampled, "train.resume": checkpoint}))
    expected, got = _losses(whole), _losses(resumed)
    assert sorted(got) == [4, 5]
    assert got == {step: expected[step] for step in (4, 5)}
    assert json.loads((resumed / "data_skips_rank0.json").read_text())["skipped"] == 0


@pytest.mark.slow
def test_eval_datasets_run_inside_training(tmp_path: Path) -> None:
    """eval.datasets: a CLIP_benchmark-layout set (written from a class folder) is evaluated
    every eval.every steps, logged as eval/<name>/<metric>, with CLIP_benchmark-shaped JSON."""
    from data_pipelines.clip_benchmark_layout import write_clip_benchmark_layout

    folder = tmp_path / "folder"
    for sample in generate_samples(12, seed=3):
        (folder / f"class {sample['cls']}").mkdir(parents=True, exist_ok=True)
        sample["image"].save(folder / f"class {sample['cls']}" / f"{sample['key']}.png")
    write_clip_benchmark_layout(folder, tmp_path / "wds", image_format="png")
    shards = tmp_path / "shards"
    write_shards(generate_samples(40, seed=0), shards, samples_per_shard=10)
    out = tmp_path / "run"
    overrides = {
        "train.steps": 2,
        "eval.every": 1,
        "eval.datasets": f"{{shapes: {tmp_path / 'wds'}}}",
    }
    result = train(_config(shards, out, **overrides))
    assert 0 <= result.eval_metrics["eval/shapes/acc1"] <= 1
    saved = json.loads((out / "results" / "shapes_zeroshot_classification.json").read_text())
    assert saved["task"] == "zeroshot_classification" and "acc1" in saved["metrics"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/shapes/acc1" in r]
    assert [r["step"] for r in evals] == [1, 2]  # every eval.every step, for `vlp watch`
    assert evals[-1]["eval/shapes/acc1"] == result.eval_metrics["eval/shapes/acc1"]
    assert (out / "plots" / "loss_curve.png").is_file()


@pytest.mark.slowest(seconds=60)
def test_a_demo_sized_run_beats_chance_on_held_out_shapes(tmp_path: Path) -> None:
    """The demo's model, data generator and batch for 60 steps on 2000 samples at four times
    the demo's lr, fixed seed: zero-shot on 1800 held-out images (9 classes, chance 1/9 = 0.111)
    with the eval templates, which the training captions never use. Measured here: acc1 0.180,
    mean per-class recall 0.181 (120 steps at twice the demo's lr gave 0.201 in 1.65x the time;
    200 steps on 270 images 0.274 in 2.8x); the bar is chance + 0.037, 5 standard errors above
    chance at n = 1800 (evaluating many images is cheap, training steps are not). The stream
    reads in the test's process: the same batches as with a data worker (the same canonical
    stream, and the same acc1), in ~3/4 of the time on 2 busy cores."""
    from data_pipelines.synthetic import CLASSNAMES, EVAL_TEMPLATES

    write_shards(generate_samples(2000, seed=0), tmp_path / "train", samples_per_shard=500)
    write_shards(generate_samples(1800, seed=1), tmp_path / "heldout", samples_per_shard=1800)
    config = _config(
        tmp_path / "train",
        tmp_path / "run",
        **{
            "data.batch_size": 64,
            "data.workers": 0,
            "data.shuffle_buffer": 1000,
            "train.steps": 60,
            "train.log_every": 20,
            "train.checkpoint_every": 0,
            "optim.warmup_steps": 15,
            "optim.lr": 0.004,
            "eval.zeroshot_shards": tmp_path / "heldout",
            "eval.classnames": json.dumps(CLASSNAMES),
            "eval.templates": json.dumps(EVAL_TEMPLATES),
        },
    )
    metrics = train(config).eval_metrics
    chance = 1 / len(CLASSNAMES)
    bar = chance + 5 * math.sqrt(chance * (1 - chance) / 1800)
    assert metrics["eval/heldout/acc1"] >= bar, metrics
    assert metrics["eval/heldout/mean_per_class_recall"] >= bar, metrics
