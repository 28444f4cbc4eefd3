"""Per-rank seeds after the model is built: every rank starts from the same weights and draws
its own dropout masks, and two runs (or a run and its resume) draw the same ones."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from tests.ddp_helpers import run_on_ranks
from vlp.config import Config
from vlp.models import create_model
from vlp.objectives import create_objective
from vlp.training import Trainer, create_accelerator
from vlp.training.seeding import rank_seed

CAPTIONS = ["a red star", "a blue ring", "a cross", "a heart"]


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _run(rank: int, out: Path, steps: int, resume: Path | None = None) -> dict[str, Any]:
    """A ConVIRT run (heads made by the Trainer) on ``vlp-tiny-vit`` with dropout on the image
    tower's output, drawn from torch's generator as ``nn.Dropout`` draws; seeded as
    ``launch/run.py`` seeds; from the checkpoint ``resume`` if given. Returns each step's mask
    and the weights every rank had when they were handed to ``accelerator.prepare`` (before
    DDP would broadcast rank 0's). Steps are taken by hand: ``fit`` ends with
    ``end_training``, which closes the process group."""
    set_seed(7)  # what launch/run.py does before building the model
    clip, _, _, tokenizer = create_model("vlp-tiny-vit")
    masks: list[torch.Tensor] = []

    def dropout(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        dropped = F.dropout(output, 0.5, training=True)
        masks.append(dropped != 0)
        return dropped

    visual: Any = clip.visual
    visual.register_forward_hook(dropout)
    config = Config()
    config.train.out_dir = str(out)
    config.train.report_to = []
    config.train.seed = 7
    config.train.steps = steps
    generator = torch.Generator().manual_seed(rank)
    batches = [
        {"image": torch.randn(4, 3, 32, 32, generator=generator), "text": tokenizer(CAPTIONS)}
        for _ in range(steps)
    ]
    accelerator = create_accelerator(out, log_with=None)
    prepared: dict[str, str] = {}
    prepare = accelerator.prepare

    def recording_prepare(*args: Any) -> Any:
        prepared["weights"] = _checksum(args[0])
        return prepare(*args)

    accelerator.prepare = recording_prepare
    trainer = Trainer(
        config,
        clip,
        create_objective("convirt", frozen_text_layers=-1),
        batches,
        accelerator=accelerator,
        model_info={},
    )
    if resume is not None:
        trainer.load_checkpoint(resume)
    while trainer.step < steps:
        parts, _ = trainer.train_step(batches[trainer.step])
        assert parts is not None
        trainer.save_checkpoint()
    return {"masks": torch.stack(masks), "weights": prepared["weights"]}


def _runs_on_a_rank(rank: int, world: int, out: str) -> dict[str, Any]:
    root = Path(out)
    whole = _run(rank, root / "whole", 2)
    again = _run(rank, root / "again", 2)
    first = _run(rank, root / "split", 1)
    resumed = _run(rank, root / "resumed", 2, root / "split" / "checkpoints" / "step_00000001")
    return {
        "whole": whole["masks"],
        "again": again["masks"],
        "split": torch.cat([first["masks"], resumed["masks"]]),
        "weights": whole["weights"],
    }


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_masks_from_the_same_initial_weights(tmp_path):
    """Before: every rank kept ``train.seed``'s generator, so both ranks drew the same masks."""
    ranks = run_on_ranks(_runs_on_a_rank, 2, str(tmp_path), timeout_s=300, torchrun_env=True)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the heads too: made before the reseed
    for rank in ranks:
        assert rank["whole"].shape[0] == 2  # one mask per step
        assert torch.equal(rank["whole"], rank["again"])  # two identical runs
        assert torch.equal(rank["whole"], rank["split"])  # a run stopped at step 1 and resumed
    assert not torch.equal(ranks[0]["whole"][0], ranks[1]["whole"][0])
    assert not torch.equal(ranks[0]["whole"][1], ranks[1]["whole"][1])


def test_rank_seeds_differ_by_rank_and_by_run_seed():
    """Not ``seed + rank``: seed 1's rank 0 must not draw what seed 0's rank 1 draws."""
    seeds = {rank_seed(seed, rank) for seed in range(16) for rank in range(64)}
    assert len(seeds) == 16 * 64
    assert all(0 <= s < 2**32 for s in seeds)
    assert rank_seed(3, 5) == rank_seed(3, 5)
