"""The ConVIRT demo recipe end to end: 2 gloo ranks as `accelerate launch` starts them, accumulated
micro-batches, heads checkpointed beside open_clip's weights and applied when evaluating."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.launch.one_process_reference import assert_first_loss_is_the_one_process_loss
from tests.launch.test_pretrain import ROOT, _on_two_ranks, _overrides, shards  # noqa: F401

RECIPE = ROOT / "launch" / "configs" / "convirt_demo.yaml"


def test_the_demo_recipe_trains_its_whole_random_text_tower():
    """The paper freezes a pretrained BERT's bottom; the demo's tiny BERT is random, and frozen
    (embeddings and layer 0, before 2026-12-08) it kept the demo at chance (RESULTS.md)."""
    from vlp.config import load_config
    from vlp.models import create_model
    from vlp.objectives.registry import create_objective

    config = load_config(RECIPE, [])
    objective = create_objective(config.objective.name, config.objective.section())
    model = objective.build_model(create_model(config.model.name)[0])
    text = dict(model.clip.text.named_parameters())
    assert any("embeddings" in n for n in text) and any("encoder.layer.0." in n for n in text)
    assert all(p.requires_grad for p in text.values())
    assert not model.clip.logit_scale.requires_grad  # τ stays fixed, as the paper's


@pytest.mark.slow
def test_two_process_convirt_demo_recipe_trains_checkpoints_heads_and_evaluates(shards, tmp_path):  # noqa: F811
    from evals.loading import load_model
    from vlp.models.vlp_model import VlpModel

    out = tmp_path / "run"
    extra = {"train.steps": 3, "train.accum_steps": 2, "data.batch_size": 4}
    _on_two_ranks(_overrides(shards, out, **extra), recipe=RECIPE)
    assert_first_loss_is_the_one_process_loss(out, RECIPE, _overrides(shards, out, **extra))
    log = (out / "train.log").read_text()
    assert "step 3/3" in log and "contrastive_loss" in log and "logit_scale" not in log
    checkpoint = out / "checkpoints" / "step_00000003"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 16
    weights = load_file(str(checkpoint / "model.safetensors"))
    heads = load_file(str(checkpoint / "heads.safetensors"))
    assert not any(k.startswith(("clip.", "heads.")) for k in weights)  # open_clip's own keys
    assert sorted(heads) == ["image.1.bias", "image.1.weight", "text.1.bias", "text.1.weight"]
    meta = json.loads((checkpoint / "model_config.json").read_text())
    assert meta["objective"]["name"] == "convirt"
    assert meta["objective"]["settings"]["frozen_text_layers"] == -1

    loaded = load_model(out)
    assert isinstance(loaded.model, VlpModel)
    torch.testing.assert_close(
        loaded.model.heads.state_dict()["image.1.weight"], heads["image.1.weight"]
    )
    image = torch.zeros(2, 3, 32, 32)
    assert loaded.model.encode_image(image, normalize=True).shape == (2, 128)  # the head's width

    # export: open_clip's files load in open_clip alone; the heads travel beside them
    import open_clip

    from evals.export import export_run

    export = export_run(out, tmp_path / "export")
    assert (export / "heads.safetensors").is_file()
    assert "open_clip loads the bare towers" in (export / "README.md").read_text()
    again = load_model(export)
    assert isinstance(again.model, VlpModel)
    torch.testing.assert_close(
        again.model.encode_image(image, normalize=True),
        loaded.model.encode_image(image, normalize=True),
    )
    bare, *_ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    assert bare.encode_image(image).shape[-1] == 128  # the tower's own embedding, no heads
