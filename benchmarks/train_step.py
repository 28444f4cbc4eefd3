"""Training-step throughput: vlp's Trainer step vs a plain open_clip step, in the same run.

Both sides train the same model config from the same initial weights on the same batch (fp32,
CPU, one process): open_clip's side is model -> ``ClipLoss`` -> backward -> AdamW step; vlp's
side is ``Trainer.train_step`` (objective through the exact contrastive core, non-finite check,
scheduler, logit-scale clamp). Gradient clipping is off on vlp's side because the open_clip step
has none (like for like; ``--clip`` turns it on). Rounds alternate between the two in ABBA
order so that machine noise and warm caches favour neither side. Prints a table and writes
``benchmarks/results/train_step.json``.

    .venv/bin/python benchmarks/train_step.py [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import open_clip
import torch

from vlp.config import Config
from vlp.models import create_model, model_config
from vlp.objectives import create_objective
from vlp.training import Trainer, create_accelerator

RESULTS = Path(__file__).parent / "results" / "train_step.json"
CASES = [("vlp-tiny-vit-64", 32), ("vlp-tiny-vit-64", 128), ("ViT-S-32", 32), ("ViT-S-32", 128)]


def config_at_64px(name: str, folder: Path) -> str:
    """A model-config JSON of ``name`` with 64 px images (both sides build from it)."""
    config = model_config(name)
    config["vision_cfg"]["image_size"] = 64
    path = folder / f"{name}-64px.json"
    path.write_text(json.dumps(config))
    return str(path)


def make_batch(tokenizer: Any, batch_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    captions = [f"a photo of shape number {i}" for i in range(batch_size)]
    return {
        "image": torch.randn(batch_size, 3, 64, 64, generator=generator),
        "text": tokenizer(captions),
    }


def open_clip_stepper(config_path: str, state: dict, batch: dict) -> Any:
    """A closure running one plain open_clip training step."""
    model = open_clip.create_model(Path(config_path).stem)
    model.load_state_dict(state)
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        image_features, text_features, scale = model(batch["image"], batch["text"])
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def vlp_stepper(
    config_path: str, state: dict, batch: dict, out_dir: Path, grad_clip: float | None
) -> Any:
    """A closure running one vlp ``Trainer.train_step`` (the loop's whole per-step work)."""
    model, *_ = create_model(config_path)
    model.load_state_dict(state)
    config = Config()
    config.train.out_dir = str(out_dir)
    config.optim.lr = 1e-4
    config.optim.grad_clip = grad_clip
    trainer = Trainer(
        config,
        model,
        create_objective("clip"),
        (),
        accelerator=create_accelerator(out_dir, log_with=None),
        model_info={},
    )
    return lambda: trainer.train_step(batch)


def samples_per_second(step: Any, batch_size: int, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - started)


def run(steps: int, rounds: int, grad_clip: float | None) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, batch_size in CASES:
            path = config_at_64px(name, folder)
            model, _, _, tokenizer = create_model(path)
            batch = make_batch(tokenizer, batch_size)
            state = model.state_dict()
            sides = {
                "open_clip": open_clip_stepper(path, state, batch),
                "vlp": vlp_stepper(path, state, batch, folder / "run", grad_clip),
            }
            for step in sides.values():  # warm-up: allocator, first-call overheads
                step()
            rates: dict[str, list[float]] = {side: [] for side in sides}
            order = list(sides)
            for _ in range(rounds):  # A B, B A, A B, ...: neither side always runs second
                for side in order:
                    rates[side].append(samples_per_second(sides[side], batch_size, steps))
                order.reverse()
            median = {side: statistics.median(values) for side, values in rates.items()}
            rows.append(
                {
                    "model": f"{name} @64px",
                    "batch": batch_size,
                    "open_clip_samples_per_s": median["open_clip"],
                    "vlp_samples_per_s": median["vlp"],
                    "ratio": median["vlp"] / median["open_clip"],
                    "rounds": rates,
                }
            )
            print_row(rows[-1])
    return rows


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['model']:<24}{row['batch']:>6}{row['open_clip_samples_per_s']:>14.1f}"
        f"{row['vlp_samples_per_s']:>12.1f}{row['ratio']:>9.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--clip", type=float, default=None, help="vlp-side grad-norm clipping")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init per model
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(f"{'model':<24}{'batch':>6}{'open_clip/s':>14}{'vlp/s':>12}{'ratio':>10}")
    rows = run(args.steps, args.rounds, args.clip)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "steps": args.steps,
                "rounds": args.rounds,
                "vlp_grad_clip": args.clip,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
