"""PRIOR's demo recipes end to end: `vlp prior train-reference` trains P_r on the captions
(accumulating 2 micro-batches: plain accumulation, as nothing couples its samples), then
2 gloo ranks as `accelerate launch` starts them train PRIOR on a tiny CoCa with it, accumulating 2
micro-batches; P_r stays out of the checkpoint, and the export loads in open_clip (and in vlp
with the recipe's SentencePiece tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from data_pipelines.synthetic import CLASSNAMES, generate_samples
from data_pipelines.write import write_shards
from tests.launch.one_process_reference import assert_first_loss_is_the_one_process_loss
from tests.launch.test_pretrain import ROOT, _on_two_ranks, _overrides, shards  # noqa: F401

CONFIGS = ROOT / "launch" / "configs"


@pytest.mark.slow
def test_reference_then_two_process_prior_demo(shards, tmp_path):  # noqa: F811
    import open_clip

    from evals.export import export_run
    from evals.loading import load_model
    from launch.cli import main
    from launch.demo import _captioning_metrics

    reference = tmp_path / "reference"
    # eval.* given too: a text-only LM's run skips it (it would score untrained, frozen towers)
    held_out = {"eval.zeroshot_shards": shards, "eval.classnames": json.dumps(CLASSNAMES)}
    extra = {"train.steps": 2, "train.accum_steps": 2, **held_out}
    args = ["prior", "train-reference", "--shards", str(shards), "--out", str(reference),
            "--config", str(CONFIGS / "prior_reference_demo.yaml"),
            *_overrides(shards, reference, **extra)]  # fmt: skip
    assert main(args) == 0
    lm = load_file(str(reference / "checkpoints" / "step_00000002" / "heads.safetensors"))
    assert lm and all(key.startswith("lm.") for key in lm)
    assert "eval.* is not run" in (reference / "train.log").read_text()
    assert "eval/" not in (reference / "metrics.jsonl").read_text()
    assert not list(reference.glob("results/*.json"))

    out = tmp_path / "run"
    extra = {"train.steps": 2, "train.accum_steps": 2, "data.batch_size": 4,
             "objective.prior.reference": reference}  # fmt: skip
    _on_two_ranks(_overrides(shards, out, **extra), recipe=CONFIGS / "prior_demo.yaml")
    # the weighted caption loss and the contrastive loss over the global batch
    assert_first_loss_is_the_one_process_loss(
        out, CONFIGS / "prior_demo.yaml", _overrides(shards, out, **extra)
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if "train/loss" in line][-1]
    assert last["train/caption_loss"] > 0 and last["train/contrastive_loss"] > 0
    checkpoint = out / "checkpoints" / "step_00000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 16
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert "text_decoder.text_projection" in weights
    assert not any("reference" in key or key.startswith("lm.") for key in weights)
    assert not (checkpoint / "heads.safetensors").exists() or not load_file(
        str(checkpoint / "heads.safetensors")
    )

    # what `vlp demo` adds to PRIOR's table: its captions of held-out images, scored
    held_out_images = tmp_path / "held_out"
    write_shards(generate_samples(16, seed=1), held_out_images, samples_per_shard=16)
    scores = _captioning_metrics(out, held_out_images, batch_size=16)
    assert set(scores) == {"captioning_bleu4", "captioning_cider"}
    assert all(0 <= value < 10 for value in scores.values())

    export = export_run(out, tmp_path / "export")
    coca, *_ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    assert hasattr(coca, "text_decoder")
    assert coca.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 128)
    _, _, tokenizer, _ = load_model(export)  # the recipe's packaged tokenizer travels with it
    assert (export / "sentencepiece.model").is_file() and tokenizer.sot_token_id == 2
