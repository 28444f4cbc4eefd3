"""vlp's side of ``gpu_throughput.py``: ``Trainer.train_step`` on vlp's stream, timed per step.

The run is built as ``vlp train`` builds it (:mod:`launch.build`: objective, model, the
objective's batch fields (``data.uint8_batches=auto``: uint8 views in pinned memory on the GPU),
the stream; the Trainer with its optimizer and precision), with ``--set`` config overrides for
the setting under test (``optim.fused=false``, ``train.compile=true``,
``model.patch_dropout=0.5``, ``data.uint8_batches=false``...). Data wait is
``DeviceBatches.next`` (the stream's batch, copied to the GPU and normalised there); compute is ``train_step`` (vlp's
step syncs once per step for its non-finite check anyway). Then the compute-only ceiling: the
same step on the last batch, already on the device. Prints one JSON line.

    python benchmarks/throughput_vlp.py --shards DIR --model ViT-B-32 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from step_timing import ceiling, emit, forward_flops, timed_steps

from launch.build import batch_fields, build_model, build_objective, build_stream
from vlp.config import load_config
from vlp.training import Trainer, create_accelerator
from vlp.training.device_batches import DeviceBatches
from vlp.training.threads import set_threads


def parser() -> argparse.ArgumentParser:
    """The options of one side's run (the open_clip side takes the same)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="folder of webdataset shards")
    parser.add_argument("--model", required=True, help="open_clip or vlp model name")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--ceiling-steps", type=int, default=10, help="steps on one GPU batch")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--set", nargs="*", default=[], help="vlp config overrides KEY=VALUE")
    return parser


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """One timed run (see the module docstring); the result as a dict."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if opts.precision == "bf16" else "no"
    with tempfile.TemporaryDirectory(prefix="vlp-throughput-") as out:
        config = load_config(
            None,
            [
                f"model.name={opts.model}", f"data.train_shards={opts.shards}",
                f"data.batch_size={opts.batch_size}", f"data.workers={opts.workers}",
                f"train.steps={opts.warmup + opts.steps + opts.ceiling_steps + 2}",
                f"train.out_dir={out}", "train.report_to=[]", "train.checkpoint_every=0",
                "optim.warmup_steps=1", *opts.set,
            ],
        )  # fmt: skip
        objective = build_objective(config)
        accelerator = create_accelerator(Path(out))
        model, preprocess_train, _, tokenizer, info = build_model(config)
        objective.use_tokenizer(tokenizer)
        parts = batch_fields(
            config, objective.fields(), model, preprocess_train, tokenizer, accelerator.device
        )
        set_threads(config.train.threads)
        stream = build_stream(config, parts, 0, 1)
        trainer = Trainer(
            config, model, objective, stream, accelerator=accelerator, model_info=info,
            image_transform=parts.normalize,
        )  # fmt: skip
        device = accelerator.device
        feed = DeviceBatches(
            stream, 1, device, list(objective.fields().views), parts.normalize
        )  # fmt: skip

        def step(batch: list[dict[str, Any]]) -> int:
            trainer.train_step(batch)
            return len(batch[0]["text"])

        first = feed.next(0)
        clip = accelerator.unwrap_model(trainer.model).clip
        clip.train()
        with torch.no_grad():
            flops = forward_flops(lambda: clip(first[0]["image"][:1], first[0]["text"][:1]))
        times = timed_steps(lambda: feed.next(0), step, device, opts.warmup, opts.steps)
        times["ceiling_samples_per_s"] = ceiling(step, first, device, opts.ceiling_steps)
        return {
            "side": "vlp",
            "settings": opts.set,
            "forward_flops_per_sample": flops,
            "precision": str(accelerator.mixed_precision),
            **times,
        }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    emit(run(parser().parse_args(argv)))


if __name__ == "__main__":
    main()
