"""PyramidCLIP and PRIOR (CoCa) with FSDP's shardable scalars, on real open_clip towers.

FSDP2 shards along dim 0, so :func:`make_scalars_shardable` gives every 0-dim parameter shape
[1] (open_clip's ``logit_scale``). An objective with heads must train as before: the loss a
scalar, the loss, gradients and the parameters after one SGD step (and the objective's
``after_step``) equal to the unsharded model's, over the full batch and over GradCache's
micro-batches, in float64. SigLIP, ConVIRT, ProtoCLIP and a three-level objective are checked on
tiny towers in ``test_gradcache.py``; these two need a real ViT (PyramidCLIP splits it) and a
real CoCa (PRIOR's captioner): the repo's tiny ones, ``vlp-tiny-vit`` (narrowed, below) and
``vlp-tiny-coca-procedural``, with the procedural tokenizer.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.objectives.test_prior import _batch as coca_batch
from tests.objectives.test_prior import reference_run
from tests.objectives.test_pyramidclip import _inputs
from tests.training.test_gradcache import _grads, accumulate, assert_same_tensors
from vlp.models import create_model, model_config
from vlp.objectives import total_loss
from vlp.objectives.prior.objective import PriorObjective
from vlp.objectives.pyramidclip import PyramidClipObjective
from vlp.training.model_state import make_scalars_shardable

TOKENIZER = "vlp:procedural-bpe"
"""A 192-piece vocabulary, so that the text towers' embeddings stay small."""


def _narrowed(name: str, **towers: dict) -> dict:
    """``model_kwargs`` that make the shipped config ``name`` narrower (towers' keys updated)."""
    config = model_config(name)
    return {tower: {**config.get(tower, {}), **keys} for tower, keys in towers.items()}


def _pyramidclip(tmp_path):
    """PyramidCLIP (all six terms, the ROI branch on pooled regions) on ``vlp-tiny-vit``
    narrowed to 3 blocks of width 64 (f2 its last 2) and the procedural vocabulary."""
    torch.manual_seed(0)
    narrow = _narrowed(
        "vlp-tiny-vit",
        vision_cfg={"layers": 3, "width": 64, "patch_size": 8},
        text_cfg={"context_length": 24, "vocab_size": 192, "width": 64, "layers": 2,
                  "pool_type": "eos", "eos_id": 3},
    )  # fmt: skip
    clip, _, _, tokenizer = create_model("vlp-tiny-vit", tokenizer=TOKENIZER, model_kwargs=narrow)
    objective = PyramidClipObjective(last_blocks=2)
    return objective, objective.build_model(clip).double(), _inputs(tokenizer, 8, 2)


def _prior(tmp_path):
    """PRIOR, its token weights from a frozen reference LM, on ``vlp-tiny-coca-procedural``
    narrowed to width 64 (2 image, 2 text and 1 decoder block)."""
    torch.manual_seed(0)
    name = "vlp-tiny-coca-procedural"
    narrow = _narrowed(
        name,
        vision_cfg={"layers": 2, "width": 64, "patch_size": 8, "attn_pooler_queries": 8},
        text_cfg={"width": 64, "layers": 2},
        multimodal_cfg={"width": 64, "layers": 1},
    ) | {"embed_dim": 64}  # the decoder attends to the image tokens at the embedding width
    clip, _, _, tokenizer = create_model(name, tokenizer=TOKENIZER, model_kwargs=narrow)
    reference = reference_run(tmp_path / "ref", clip, model=name, tokenizer=TOKENIZER)
    objective = PriorObjective(reference=str(reference))
    return objective, objective.build_model(clip.double()), coca_batch(tokenizer, 8)


MODELS = {"pyramidclip": _pyramidclip, "prior": _prior}


def _one_step(model, objective, batch, accumulated: bool) -> torch.Tensor:
    """One training step's loss and gradients (full batch, or GradCache with k = 4)."""
    if accumulated:
        micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
        return accumulate(model, objective, micro)
    loss = total_loss(objective(model(objective.model_inputs(batch)), batch))
    loss.backward()
    return loss.detach()


def _step(model, objective) -> dict[str, torch.Tensor]:
    """SGD, then the objective's post-step rule (the scale's clamp); the parameters after."""
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    objective.after_step(model)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("accumulated", [False, True], ids=["full-batch", "gradcache"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_objectives_with_heads_train_as_before_with_shardable_scalars(name, accumulated, tmp_path):
    objective, plain, batch = MODELS[name](tmp_path)
    sharded = copy.deepcopy(plain)
    scalars = make_scalars_shardable(sharded)
    assert "clip.logit_scale" in scalars

    reference = _one_step(plain, objective, batch, accumulated)
    loss = _one_step(sharded, objective, batch, accumulated)
    assert loss.shape == ()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    expected = _grads(plain)
    assert any(k.startswith("heads.roi.") for k in expected) == (name == "pyramidclip")
    got = {k: g.reshape(expected[k].shape) for k, g in _grads(sharded).items()}
    assert_same_tensors(got, expected)
    expected = _step(plain, objective)
    got = {k: p.reshape(expected[k].shape) for k, p in _step(sharded, objective).items()}
    assert_same_tensors(got, expected)
