"""Tiny open_clip models trained by vlp's Trainer on one fixed batch, in this process: the
optimizer and fast-path tests compare such runs (uninterrupted against resumed, one setting
against another) in a second or two each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.config import load_config
from vlp.models import create_model
from vlp.objectives import create_objective
from vlp.training import Trainer, create_accelerator


def write_model_config(folder: Path, name: str, model: dict[str, Any]) -> str:
    """``model`` (an open_clip model config) as ``folder/name.json``, a path create_model takes."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(model))
    return str(path)


def fit_one_batch(model_config: str, out: Path, steps: int, overrides: list[str]) -> Trainer:
    """``steps`` steps of CLIP on one batch (4 random 16-px images, 4 rows of 8 random tokens
    below the model's vocabulary) from seeded initial weights, with the config's defaults,
    lr 1e-2, one warmup step and ``overrides`` (`vlp train`'s KEY=VALUE); the Trainer after fit."""
    torch.manual_seed(0)
    model, *_ = create_model(model_config)
    config = load_config(
        None,
        [
            f"train.out_dir={out}", f"train.steps={steps}", "train.report_to=[]",
            "optim.warmup_steps=1", "optim.lr=1e-2", *overrides,
        ],
    )  # fmt: skip
    vocab = json.loads(Path(model_config).read_text())["text_cfg"]["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(4, 3, 16, 16, generator=generator),
        "text": torch.randint(1, vocab, (4, 8), generator=generator),
    }
    trainer = Trainer(
        config, model, create_objective("clip"), [batch],
        accelerator=create_accelerator(out, log_with=None), model_info={},
    )  # fmt: skip
    trainer.fit()
    return trainer
