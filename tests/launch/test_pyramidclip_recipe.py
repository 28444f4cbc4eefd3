"""The PyramidCLIP demo recipe end to end: 2 gloo ranks as `accelerate launch` starts them, 2
accumulated micro-batches, every term logged, the ROI branch checkpointed beside open_clip's
weights, and an export that open_clip loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.launch.one_process_reference import assert_first_loss_is_the_one_process_loss
from tests.launch.test_pretrain import ROOT, _on_two_ranks, _overrides, shards  # noqa: F401

RECIPE = ROOT / "launch" / "configs" / "pyramidclip_demo.yaml"


@pytest.mark.slow
def test_two_process_pyramidclip_demo_recipe_trains_and_exports(shards, tmp_path):  # noqa: F811
    import open_clip

    from evals.export import export_run

    out = tmp_path / "run"
    extra = {"train.steps": 2, "train.accum_steps": 2, "data.batch_size": 4}
    _on_two_ranks(_overrides(shards, out, **extra), recipe=RECIPE)
    # all six terms over the global batch, as one process computes them
    assert_first_loss_is_the_one_process_loss(out, RECIPE, _overrides(shards, out, **extra))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if "train/loss" in line][-1]
    for term in ("gs", "lt", "ga", "rs", "la", "rt"):
        assert f"train/{term}_loss" in last and f"train/L_{term}" in last
    assert last["train/summary_fallback"] == 0.0  # every procedural sample has a summary
    checkpoint = out / "checkpoints" / "step_00000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 16
    heads = load_file(str(checkpoint / "heads.safetensors"))
    assert sorted(heads) == ["roi.embed.weight"]  # φ only: the tower's class_embedding, ln_pre

    export = export_run(out, tmp_path / "export")
    bare, *_ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    image = torch.zeros(2, 3, 32, 32)
    assert bare.encode_image(image).shape == (2, 128)
