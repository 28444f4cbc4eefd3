"""The ProtoCLIP demo recipe end to end: 2 gloo ranks as `accelerate launch` starts them, 2
accumulated micro-batches, episodes clustered on the gathered features of both ranks, the heads
and the episode state checkpointed, and an export that open_clip loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.launch.one_process_reference import assert_first_loss_is_the_one_process_loss
from tests.launch.test_pretrain import ROOT, _on_two_ranks, _overrides, shards  # noqa: F401

RECIPE = ROOT / "launch" / "configs" / "protoclip_demo.yaml"


@pytest.mark.slow
def test_two_process_protoclip_demo_recipe_trains_in_episodes_and_exports(shards, tmp_path):  # noqa: F811
    import open_clip

    from evals.export import export_run

    out = tmp_path / "run"
    extra = {
        "train.steps": 6,
        "train.accum_steps": 2,
        "data.batch_size": 4,
        "objective.protoclip.episode_size": 32,  # 2 steps of the global batch 16
        "objective.protoclip.k": 4,
        "objective.protoclip.lit_episodes": 1,
    }
    _on_two_ranks(_overrides(shards, out, **extra), recipe=RECIPE)
    # step 1, in the first (CLIP) episode: the loss over the global batch
    assert_first_loss_is_the_one_process_loss(out, RECIPE, _overrides(shards, out, **extra))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    episodes = [line for line in lines if "episode/index" in line]
    assert [e["step"] for e in episodes] == [0, 2, 4]
    assert [e["episode/phase"] for e in episodes] == [0.0, 1.0, 2.0]  # clip, proto, lit
    assert episodes[0]["episode/feature_mib"] == 32 * 128 * 2 * 4 / 2**20
    steps = {line["step"]: line for line in lines if "train/loss" in line}
    assert "train/proto_i2t_loss" in steps[3] and "train/proto_t2i_loss" in steps[4]
    assert "train/proto_i2t_loss" not in steps[6]
    checkpoint = out / "checkpoints" / "step_00000006"
    assert (checkpoint / "episode.safetensors").is_file()
    heads = load_file(str(checkpoint / "heads.safetensors"))
    assert {k.split(".")[0] for k in heads} == {"proto_image", "proto_text", "proto_scale"}

    export = export_run(out, tmp_path / "export")
    bare, *_ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    assert bare.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
