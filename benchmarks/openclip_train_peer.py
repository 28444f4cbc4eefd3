"""open_clip_train's side of ``gpu_throughput.py``: its data pipeline and its training step, timed
per step like vlp's side.

Runs in open_clip's own environment (``.venv-openclip``, ``make bench-peer``; on a GPU machine
its wheels on ``PYTHONPATH``), so it imports nothing of vlp. The loader is
``open_clip_train.data.get_wds_dataset`` with the arguments ``main`` passes for
``--train-data DIR --dataset-resampled --batch-size B --workers W``; the step is
``open_clip_train.train.train_one_epoch``'s, inlined so that data wait and compute can be timed
apart: ``to(device, non_blocking=True)``, autocast (``--precision amp_bf16``), ``ClipLoss``,
backward, AdamW (its parameter groups: no decay on gains and biases, betas 0.9/0.98, eps 1e-6),
the logit-scale clamp. No gradient clipping (its default). Prints one JSON line.

    .venv-openclip/bin/python benchmarks/openclip_train_peer.py --shards DIR --model ViT-B-32
"""

from __future__ import annotations

import argparse
import math
import os
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from open_clip_train.data import get_wds_dataset
from step_timing import autocast, ceiling, emit, timed_steps


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """open_clip_train's AdamW groups (``main``: ``exclude`` = gains, biases, logit scale)."""

    def excluded(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if excluded(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not excluded(n, p)], "weight_decay": 0.2},
        ],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """One timed run (see the module docstring); the result as a dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = opts.precision if device.type == "cuda" else "fp32"
    name = opts.model
    if name.endswith(".json"):  # a model-config file (the CPU mode's tiny ViT)
        open_clip.add_model_config(name)
        name = os.path.basename(name)[: -len(".json")]
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        name, device=device, output_dict=True
    )
    args = SimpleNamespace(
        train_data=f"{opts.shards}/{{{_shard_range(opts.shards)}}}.tar",
        val_data=None,
        dataset_resampled=True,
        train_num_samples=10**7,  # an "epoch" far longer than the run
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=opts.batch_size,
        world_size=1,
        workers=opts.workers,
    )
    tokenizer = open_clip.get_tokenizer(name)
    loader = get_wds_dataset(args, preprocess_train, is_train=True, tokenizer=tokenizer).dataloader
    batches = iter(loader)
    loss = open_clip.ClipLoss()
    optimizer = _optimizer(model)
    model.train()

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = next(batches)
        return images.to(device, non_blocking=True), texts.to(device, non_blocking=True)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        images, texts = batch
        optimizer.zero_grad()
        with autocast(device, precision):
            out = model(images, texts)
            total = sum(loss(**out, output_dict=True).values())
        total.backward()  # type: ignore[union-attr]
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return len(images)

    first = next_batch()
    times = timed_steps(next_batch, step, device, opts.warmup, opts.steps)
    times["ceiling_samples_per_s"] = ceiling(step, first, device, opts.ceiling_steps)
    return {"side": "open_clip", "settings": [], "precision": precision, **times}


def _shard_range(folder: str) -> str:
    """``00000..NNNNN`` over the folder's ``.tar`` files (open_clip_train expands braces)."""
    tars = sorted(name for name in os.listdir(folder) if name.endswith(".tar"))
    return f"{tars[0][:-4]}..{tars[-1][:-4]}"


def parser() -> argparse.ArgumentParser:
    """The options of one side's run (``throughput_vlp.py``'s, without ``--set``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in (
        ("--shards", str, None), ("--model", str, None), ("--batch-size", int, 256),
        ("--workers", int, 1), ("--warmup", int, 10), ("--steps", int, 30),
        ("--ceiling-steps", int, 10), ("--precision", str, "bf16"),
    ):  # fmt: skip
        parser.add_argument(flag, type=kind, default=default, required=default is None)
    return parser


def main(argv: list[str] | None = None) -> None:
    emit(run(parser().parse_args(argv)))


if __name__ == "__main__":
    main()
