"""Exact gradient accumulation (GradCache): k micro-batches give one k times larger batch,
for any objective that declares its outputs (embeddings, shared scalars, per-sample tensors)."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.ddp_helpers import run_on_ranks
from vlp.distributed import contrastive_loss
from vlp.objectives import Objective, create_objective, total_loss
from vlp.objectives.base import Coupled, PerSample, Shared
from vlp.objectives.convirt import ConvirtObjective
from vlp.training.gradcache import cached_batch_loss, replay_backward
from vlp.training.model_state import make_scalars_shardable

CPU = torch.device("cpu")


class TinyClip(nn.Module):
    """A CLIP-shaped float64 model: two small towers (LayerNorm, optional dropout), s and β."""

    def __init__(self, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(
            nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Dropout(dropout), nn.Linear(8, 4)
        ).double()
        self.text = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 4))
        self.text.double()
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64)) if bias else None

        self.visual = SimpleNamespace(output_dim=4)  # what heads read (open_clip's towers)

    def encode_image(self, image, normalize=False):
        features = self.image(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize=False):
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features


class ClipWithSampleTerm(Objective):
    """CLIP plus a per-sample term, so that both halves of the objective are exercised."""

    def __init__(self):
        super().__init__()
        self.clip = create_objective("clip", weights=(0.75, 0.25), smoothing=0.1)

    def batch_loss(self, features):
        return self.clip.batch_loss(features)

    def sample_loss(self, outputs, batch):
        return {"norm_loss": (outputs["image_features"][:, 0] ** 2).mean()}


class ThreeLevels(Objective):
    """Three image and three text embeddings (a pyramid's shape: two levels come from heads),
    a per-sample output used only by ``sample_loss``, and a learned scale."""

    outputs = {
        **{f"image_{i}": Coupled() for i in range(3)},
        **{f"text_{i}": Coupled() for i in range(3)},
        "logit_scale": Shared(),
        "aux": PerSample(),
    }

    def heads(self, clip):
        torch.manual_seed(1)
        return {
            name: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)).double()
            for name in ("image_1", "image_2", "text_1", "text_2")
        }

    def encode(self, model, inputs):
        image = model.clip.encode_image(inputs["image"])
        text = model.clip.encode_text(inputs["text"])
        out = {"image_0": F.normalize(image, dim=-1), "text_0": F.normalize(text, dim=-1)}
        for i in (1, 2):
            out[f"image_{i}"] = F.normalize(model.heads[f"image_{i}"](image), dim=-1)
            out[f"text_{i}"] = F.normalize(model.heads[f"text_{i}"](text), dim=-1)
        out["logit_scale"] = model.clip.logit_scale.exp()
        out["aux"] = image[:, :3] * text[:, 1:]  # [b, 3]: per sample, never cached
        return out

    def batch_loss(self, features):
        s = features["logit_scale"]
        return {
            f"level{i}_loss": contrastive_loss(
                features[f"image_{i}"], features[f"text_{i}"], s, group=self.group
            )
            * (i + 1)
            / 3
            for i in range(3)
        }

    def sample_loss(self, outputs, batch):
        return {"aux_loss": outputs["aux"].pow(2).sum(-1).mean()}


class SampleOnly(Objective):
    """Per-sample outputs only (a language model's shape, ``prior_reference``): nothing to
    cache, plain accumulation."""

    outputs = {"aux": PerSample()}

    def encode(self, model, inputs):
        image = model.clip.encode_image(inputs["image"])
        text = model.clip.encode_text(inputs["text"])
        return {"aux": image[:, :3] * text[:, 1:] * model.clip.logit_scale}  # every param used

    def sample_loss(self, outputs, batch):
        return {"aux_loss": outputs["aux"].pow(2).sum(-1).mean()}


def wrap(objective, **tiny):
    """The VlpModel the trainer builds: TinyClip plus the objective's heads."""
    return objective.build_model(TinyClip(**tiny)).double()


def full_batch_loss(model, objective, batch):
    """The reference: one forward and the whole objective on one batch."""
    return total_loss(objective(model(objective.model_inputs(batch)), batch))


OBJECTIVES = {
    "clip": lambda: create_objective("clip"),
    "clip+sample": ClipWithSampleTerm,
    "siglip": lambda: create_objective("siglip"),
    "three-levels": ThreeLevels,
    # heads on both towers, a fixed τ (the learned scale frozen), λ = 0.75
    "convirt": lambda: ConvirtObjective(frozen_text_layers=-1, head_dim=3),
    "sample-only": SampleOnly,
}


def _batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return {"image": image, "text": torch.randn(n, 5, generator=g, dtype=torch.float64)}


def _split(batch, k):
    return [
        dict(zip(batch, parts, strict=True))
        for parts in zip(*(v.chunk(k) for v in batch.values()), strict=True)
    ]


def _no_sync(model):
    return (
        model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()
    )


def accumulate(model, objective, micro_batches):
    """GradCache's two phases, as the trainer calls them."""
    cached = cached_batch_loss(model, objective, micro_batches, autocast=nullcontext, device=CPU)
    replay_backward(
        model, objective, micro_batches, cached,
        backward=torch.Tensor.backward, no_sync=_no_sync, autocast=nullcontext, device=CPU,
    )  # fmt: skip
    return cached.loss


def _grads(model):
    module = getattr(model, "module", model)
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_tensors(got: dict, expected: dict) -> None:
    """The same parameter names on both sides, and every tensor equal: a parameter that one side
    leaves without a gradient is a failure, not a skipped comparison."""
    assert sorted(got) == sorted(expected), "the two sides hold different parameter names"
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_four_micro_batches_equal_one_batch_four_times_larger(name):
    batch = _batch(16)
    objective = OBJECTIVES[name]()
    big, small = wrap(objective), wrap(objective)
    reference = full_batch_loss(big, objective, batch)
    reference.backward()
    loss = accumulate(small, objective, _split(batch, 4))
    if name in ("clip", "siglip", "convirt"):  # a sample term is not in the cached batch loss
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    got = _grads(small)
    assert_same_tensors(got, _grads(big))
    assert ("clip.logit_scale" in got) == (name != "convirt")
    assert ("clip.logit_bias" in got) == (name == "siglip")
    assert any(key.startswith("heads.") for key in got) == (name in ("three-levels", "convirt"))


def test_per_sample_only_objectives_accumulate_without_a_first_encoding():
    """No Coupled output: no grad-free forward, and dropout draws fresh masks per micro-batch
    (as k plain forwards would), not replayed ones."""
    objective = SampleOnly()
    model, reference = wrap(objective, dropout=0.3), wrap(objective, dropout=0.3)
    micro = _split(_batch(16), 4)
    torch.manual_seed(5)
    losses = [objective.sample_loss(reference(objective.model_inputs(m)), m) for m in micro]
    torch.stack([part["aux_loss"] for part in losses]).mean().backward()
    after_reference = torch.rand(8)
    torch.manual_seed(5)
    cached = accumulate(model, objective, micro)
    assert float(cached) == 0.0
    assert_same_tensors(_grads(model), _grads(reference))
    torch.testing.assert_close(torch.rand(8), after_reference)


def test_per_sample_outputs_are_not_cached():
    objective = ThreeLevels()
    cached = cached_batch_loss(
        wrap(objective), objective, _split(_batch(16), 4), autocast=nullcontext, device=CPU
    )
    assert "aux" not in cached.grads and "aux" not in cached.shared
    assert set(cached.grads) == {f"{side}_{i}" for side in ("image", "text") for i in range(3)} | {
        "logit_scale"
    }


def test_an_undeclared_output_is_named():
    class Undeclared(ThreeLevels):
        outputs = {k: v for k, v in ThreeLevels.outputs.items() if k != "aux"}

    objective = Undeclared()
    with pytest.raises(ValueError, match=r"\['aux'\]"):
        cached_batch_loss(
            wrap(objective), objective, _split(_batch(8), 2), autocast=nullcontext, device=CPU
        )


def test_cache_dtype_follows_the_declaration():
    """Declared float32 embeddings from a float64 model: cached (and their gradient) in float32."""

    class Float32Cache(ThreeLevels):
        outputs = {
            k: Coupled(torch.float32) if isinstance(v, Coupled) else v
            for k, v in ThreeLevels.outputs.items()
        }

    objective = Float32Cache()
    cached = cached_batch_loss(
        wrap(objective), objective, _split(_batch(8), 2), autocast=nullcontext, device=CPU
    )
    assert cached.grads["image_0"].dtype == torch.float32
    assert cached.grads["logit_scale"].dtype == torch.float64


def test_dropout_masks_are_replayed():
    """With dropout, GradCache equals k separate forwards (the same masks, drawn in order) kept
    in one graph with the loss on their concatenation; a 4b forward would draw other masks."""
    batch = _batch(16)
    micro = _split(batch, 4)
    objective = ClipWithSampleTerm()
    reference_model, model = wrap(objective, dropout=0.3), wrap(objective, dropout=0.3)
    torch.manual_seed(123)
    outputs = [reference_model(objective.model_inputs(m)) for m in micro]
    joined = {k: torch.cat([o[k] for o in outputs]) for k in ("image_features", "text_features")}
    joined |= {k: outputs[0][k] for k in ("logit_scale",)}
    sample = torch.stack(
        [objective.sample_loss(o, m)["norm_loss"] for o, m in zip(outputs, micro, strict=True)]
    )
    (total_loss(objective.batch_loss(joined)) + sample.mean()).backward()
    torch.manual_seed(123)
    accumulate(model, objective, micro)
    assert_same_tensors(_grads(model), _grads(reference_model))
    # After the replay the RNG is where k plain forwards would have left it.
    after_reference = torch.rand(8)
    torch.manual_seed(123)
    for m in micro:
        model(objective.model_inputs(m))
    torch.testing.assert_close(torch.rand(8), after_reference)


def _ddp_accumulation(rank, world, steps, name):
    """Rank r holds rows [r·4b, (r+1)·4b) of the global batch as 4 micro-batches of b."""
    objective = OBJECTIVES[name]()
    objective.group = torch.distributed.group.WORLD
    model = nn.parallel.DistributedDataParallel(wrap(objective, bias=False))  # every param used
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    per_rank = 16 // world
    grads, params = None, []
    for step in range(steps):
        batch = _batch(16, seed=step)
        mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        accumulate(model, objective, _split(mine, 4))
        if step == 0:
            grads = _grads(model)
        optimizer.step()
        optimizer.zero_grad()
    params = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    del model
    return {"grads": grads, "params": params}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip+sample", "three-levels", "sample-only"])
def test_two_processes_accumulating_match_one_process_full_batch(name):
    """(b, k=4) on 2 DDP ranks = (8b, k=1) on one process: gradients, and parameters after 3
    SGD steps, in float64."""
    steps = 3
    ranks = run_on_ranks(_ddp_accumulation, 2, steps, name)
    objective = OBJECTIVES[name]()
    model = wrap(objective, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        batch = _batch(16, seed=step)
        full_batch_loss(model, objective, batch).backward()
        if step == 0:
            for result in ranks:
                assert_same_tensors(result["grads"], _grads(model))
        optimizer.step()
        optimizer.zero_grad()
    params = {k: v.detach() for k, v in model.named_parameters()}
    for result in ranks:
        assert_same_tensors(result["params"], params)


SHARDABLE = {
    "siglip": lambda: create_objective("siglip"),
    "convirt": OBJECTIVES["convirt"],
    "protoclip": lambda: create_objective("protoclip"),  # step 1: CLIP phase, idle prototypes
    "three-levels": ThreeLevels,
}


@pytest.mark.parametrize("name", sorted(SHARDABLE))
def test_scalars_made_shardable_train_as_before(name):
    """FSDP2 shards along dim 0, so ``make_scalars_shardable`` gives every 0-dim parameter shape
    [1] (logit scale and bias, ProtoCLIP's prototype scale). The loss stays a scalar and equals
    the unsharded one, over the full batch and over GradCache's micro-batches, with the same
    gradients (ProtoCLIP's idle term was [1] and every stack of the losses failed at step 1)."""
    objective = SHARDABLE[name]()
    batch = _batch(16)
    plain = wrap(objective)
    reference = full_batch_loss(plain, objective, batch)
    reference.backward()
    expected = _grads(plain)
    for accumulated in (False, True):
        sharded = wrap(objective)
        scalars = make_scalars_shardable(sharded)
        assert scalars, "the objective has no 0-dim parameter to reshape"
        if accumulated:
            loss = accumulate(sharded, objective, _split(batch, 4))
        else:
            loss = full_batch_loss(sharded, objective, batch)
            loss.backward()
        assert loss.shape == ()
        if not accumulated or name in ("siglip", "convirt", "protoclip"):
            torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=1e-12)
        got = {k: g.reshape(expected[k].shape) for k, g in _grads(sharded).items()}
        assert_same_tensors(got, expected)
