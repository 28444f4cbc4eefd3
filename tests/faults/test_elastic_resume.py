"""A resume on another number of processes keeps the global batch and the sample sequence: 2
processes x 1 micro-batch stopped at step 3 and resumed on 1 process (which takes 2
micro-batches per step), and 1 process x 2 micro-batches resumed on 2 processes, both end
where 1 process x 2 micro-batches ends uninterrupted (and so does 2 x 1 uninterrupted): the same
losses per step, and the final model and optimizer within float32 round-off. The data workers
change too: 2 in the reference, none on 2 processes, 1 after the resume on 1 process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from launch.cli import main
from tests.launch.test_pretrain import DEMO, _on_two_ranks, _overrides

STEPS = 6
STOP = 3


def _train(shards: Path, out: Path, processes: int, **extra: object) -> None:
    """The demo for ``STEPS`` steps at global batch 16 (micro-batches of 8), 4 canonical
    streams, checkpoints at ``STOP`` and at the end only, no data worker unless asked: on 2
    gloo ranks as under ``accelerate launch`` (``_on_two_ranks``), or in this process."""
    settings = {
        "train.steps": STEPS, "train.checkpoint_every": STOP, "train.keep_checkpoints": STEPS,
        "train.report_to": "[]", "train.accum_steps": 2 // processes, "data.streams": 4,
        "data.resampled": False, "data.workers": 0,
    } | extra  # fmt: skip
    args = _overrides(shards, out, **settings)
    if processes == 2:
        _on_two_ranks(args)
        return
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
        assert main(["train", "--config", str(DEMO), *args]) == 0


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _continue(out: Path, shards: Path, processes: int, **extra: object) -> None:
    """``out`` holds a run stopped at ``STOP``: resume it on ``processes`` processes (the
    config still says the accum_steps of the processes it was written by)."""
    _train(shards, out, processes, **{"train.resume": "latest"} | extra)
    log = (out / "train.log").read_text()
    assert "keeps the global batch of 16" in log and "same sample sequence" in log


def _assert_ends_alike(out: Path, reference: Path) -> None:
    """Losses of every step within 1e-5 relative, model and Adam moments within 1e-5: float32
    sums of the same terms in another order (the gradient all-reduce of 2 processes against
    accumulation over 2 micro-batches), a few ulps that three Adam steps carry on."""
    expected, got = _losses(reference), _losses(out)
    assert set(range(STOP + 1, STEPS + 1)) <= set(got)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    final = f"checkpoints/step_{STEPS:08d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(out / final / name)), load_file(str(reference / final / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


def _stopped_at(run: Path, out: Path) -> Path:
    """A run folder holding only ``run``'s checkpoint of step ``STOP`` (as if it stopped there:
    the learning-rate schedule is still the one of ``STEPS`` steps)."""
    name = f"step_{STOP:08d}"
    shutil.copytree(run / "checkpoints" / name, out / "checkpoints" / name)
    return out


@pytest.mark.slowest(seconds=60)
def test_two_processes_resume_on_one_and_one_on_two(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(generate_samples(96, seed=0), shards, samples_per_shard=8)
    one, two = tmp_path / "one", tmp_path / "two"
    _train(shards, one, 1, **{"data.workers": 2})
    _train(shards, two, 2)  # the kept gloo ranks are daemons: no data worker processes
    _assert_ends_alike(two, one)  # the same steps on either layout

    two_then_one = _stopped_at(two, tmp_path / "two_then_one")
    _continue(two_then_one, shards, 1, **{"train.accum_steps": 1, "data.workers": 1})
    _assert_ends_alike(two_then_one, one)

    one_then_two = _stopped_at(one, tmp_path / "one_then_two")
    _continue(one_then_two, shards, 2, **{"train.accum_steps": 2})
    _assert_ends_alike(one_then_two, one)
