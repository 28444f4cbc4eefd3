"""PyramidCLIP: each of the six terms against a plain float64 reference (forward and
backward), the combination weights, α = 0 and the CLIP ablation, the split tower, the ROI branch
(masking, no regions, pooling inside boxes), GradCache exactness with three image and three text
embeddings, and start-up checks naming the missing field."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.launch.test_pretrain import DEMO, _overrides, shards  # noqa: F401
from tests.training.test_gradcache import _grads, accumulate, assert_same_tensors
from vlp.models import create_model, vit_split
from vlp.models.vlp_model import VlpModel
from vlp.objectives import create_objective, total_loss
from vlp.objectives.pyramidclip import TERMS, PyramidClipObjective, pooled_regions

SIDES = ("global", "local", "roi", "summary", "caption", "attributes")


def softened_infonce(image: torch.Tensor, text: torch.Tensor, scale, alpha: float):
    """Symmetric InfoNCE with targets 1−α on the positive and α/(N−1) on each negative,
    written with explicit loops over rows."""
    n = len(image)
    logits = scale * image @ text.T
    total = 0.0
    for matrix in (logits, logits.T):
        for i in range(n):
            log_p = matrix[i] - torch.logsumexp(matrix[i], dim=0)
            target = torch.full((n,), alpha / (n - 1), dtype=image.dtype)
            target[i] = 1 - alpha
            total = total - (target * log_p).sum() / 2
    return total / n


def _features(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = {
        f"{side}_features": F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
        for side in SIDES
    }
    features["logit_scale"] = torch.tensor(7.0, dtype=torch.float64)
    return {k: v.requires_grad_() for k, v in features.items()}


@pytest.mark.parametrize("lam,mu,alpha", [(1 / 3, 1 / 3, 0.2), (0.2, 0.5, 0.0), (0.0, 0.1, 0.4)])
def test_each_term_matches_a_float64_reference_forward_and_backward(lam, mu, alpha):
    objective = PyramidClipObjective(lam=lam, mu=mu, smoothing=alpha)
    features = _features()
    losses = objective.batch_loss(features)
    level = {"gs": 1 - lam - mu, "lt": 1 - lam - mu, "ga": lam, "rs": lam, "la": mu, "rt": mu}
    expected = 0.0
    for term, (image, text) in TERMS.items():
        reference = softened_infonce(
            features[f"{image}_features"], features[f"{text}_features"], 7.0, alpha
        )
        if level[term] == 0:
            assert f"{term}_loss" not in losses  # switched off: not computed
            continue
        torch.testing.assert_close(losses[f"L_{term}"], reference.detach(), rtol=1e-12, atol=0)
        expected = expected + level[term] / 2 * reference
    leaves = list(features.values())
    got = torch.autograd.grad(total_loss(losses), leaves)
    want = torch.autograd.grad(expected, leaves[:-1])  # the reference used a fixed scale
    for a, b in zip(got[:-1], want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total_loss(losses), expected.detach(), rtol=1e-12, atol=0)


def test_term_weights_switch_terms_off_and_the_model_builds_what_is_left():
    objective = PyramidClipObjective(w_rs=0.0, w_rt=0.0, w_la=2.0)
    weights = objective.settings.term_weights()
    assert weights["la"] == pytest.approx(1 / 3)  # μ/2 · 2
    assert sorted(objective.settings.active_terms()) == ["ga", "gs", "la", "lt"]
    fields = objective.fields()
    assert sorted(fields.views) == ["global", "local"] and not fields.json  # no ROI branch
    assert objective.heads(create_model("vlp-tiny-vit")[0]) == {}
    losses = objective.batch_loss(_features())
    assert "rs_loss" not in losses and "rt_loss" not in losses


def test_alpha_zero_is_plain_infonce_and_clip_only_is_clip():
    features = _features()
    clip = create_objective("clip")

    def clip_on(image, text):
        pair = {"image_features": features[image], "text_features": features[text]}
        return clip.batch_loss({**pair, "logit_scale": features["logit_scale"]})["contrastive_loss"]

    plain = PyramidClipObjective(smoothing=0.0).batch_loss(features)
    torch.testing.assert_close(
        plain["L_gs"], clip_on("global_features", "summary_features"), rtol=1e-12, atol=0
    )
    ablation = PyramidClipObjective(clip_only=True, smoothing=0.0)
    losses = ablation.batch_loss(features)
    assert [k for k in losses if k.endswith("_loss")] == ["clip_loss"]
    torch.testing.assert_close(
        total_loss(losses), clip_on("global_features", "caption_features"), rtol=1e-12, atol=0
    )
    fields = ablation.fields()
    assert list(fields.views) == ["global"] and list(fields.texts) == ["caption"]


def test_the_split_tower_is_the_open_clip_tower_and_resnets_are_refused():
    model = create_model("vlp-tiny-vit")[0].eval()
    images = torch.randn(3, 3, 32, 32)
    for k in (1, 2, 4):
        split = vit_split.f2(model.visual, vit_split.f1(model.visual, images, k), k)
        torch.testing.assert_close(split, model.visual(images), rtol=0, atol=0)
    with pytest.raises(vit_split.SplitError, match="ResNets are not supported"):
        vit_split.check_splittable(nn.Linear(2, 2), 3)
    with pytest.raises(vit_split.SplitError, match=r"last_blocks must be in \[1, 4\]"):
        vit_split.check_splittable(model.visual, 5)


def test_pooled_regions_read_inside_each_box():
    grid = torch.zeros(1, 2, 8, 8)
    grid[0, 0, :4, :4] = 1.0  # top-left quadrant
    grid[0, 1, 4:, 4:] = 3.0  # bottom-right quadrant
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    regions = pooled_regions(grid, boxes)
    torch.testing.assert_close(regions, torch.tensor([[[1.0, 0.0], [0.0, 3.0]]]))


def _pyramid_model(**settings):
    torch.manual_seed(0)
    objective = PyramidClipObjective(last_blocks=2, **settings)
    clip, _, _, tokenizer = create_model("vlp-tiny-vit")
    return objective, objective.build_model(clip).double(), tokenizer


def _inputs(tokenizer, b: int, regions: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    texts = [f"a photo of shape {i}" for i in range(b)]
    corner = torch.rand(b, regions, 2, generator=g, dtype=torch.float64) * 0.5
    boxes = torch.cat([corner, corner + 0.4], dim=-1)
    return {
        **{v: torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64) for v in ("global", "local", "roi")},
        **{t: tokenizer(texts) for t in ("summary", "caption", "attributes")},
        "boxes": boxes,
        "boxes_mask": torch.ones(b, regions, dtype=torch.bool),
    }  # fmt: skip


def test_roi_branch_masks_padding_and_a_sample_without_regions_is_finite():
    objective, model, tokenizer = _pyramid_model()
    inputs = _inputs(tokenizer, 3, 2)
    roi = model(inputs)["roi_features"]
    padded = dict(inputs)  # a third, padded region (any valid box: the data checks x0 < x1 and
    # y0 < y1, and roi_align fails on a box inverted in one axis only) changes nothing
    corner = torch.rand(3, 1, 2, dtype=torch.float64) * 0.5
    padded["boxes"] = torch.cat([inputs["boxes"], torch.cat([corner, corner + 0.3], -1)], 1)
    padded["boxes_mask"] = torch.cat([inputs["boxes_mask"], torch.zeros(3, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(padded)["roi_features"], roi, rtol=1e-10, atol=1e-12)
    padded["boxes_mask"][1] = False  # sample 1: no region at all
    outputs = model(padded)
    assert torch.isfinite(outputs["roi_features"]).all()
    empty = {
        **inputs,
        "boxes": torch.zeros(3, 0),
        "boxes_mask": torch.zeros(3, 0, dtype=torch.bool),
    }
    without = model(empty)["roi_features"]  # a batch without regions collates as [b, 0]
    assert torch.isfinite(without).all()
    torch.testing.assert_close(without[1], outputs["roi_features"][1], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(total_loss(objective(outputs, padded)))


@pytest.mark.parametrize("regions", ["json", "npy"])
def test_stored_region_features_go_through_phi_into_f2(regions):
    objective, model, tokenizer = _pyramid_model(regions=regions, region_dim=7)
    inputs = _inputs(tokenizer, 2, 3)
    inputs["regions"] = torch.randn(2, 3, 7, dtype=torch.float64)
    inputs["regions_mask"] = inputs["boxes_mask"]
    fields = objective.fields()
    assert "roi" not in fields.views and "boxes" not in fields.json
    assert "regions" in (fields.json if regions == "json" else fields.arrays)
    roi = model(objective.model_inputs(inputs))["roi_features"]
    roi.sum().backward()
    assert model.heads["roi"].embed.weight.grad.abs().sum() > 0


def test_gradcache_with_three_image_and_three_text_embeddings_is_exact():
    """k = 4 micro-batches of 2 equal one batch of 8, in float64 on the tiny ViT."""
    objective, big, tokenizer = _pyramid_model()
    _, small, _ = _pyramid_model()
    batch = _inputs(tokenizer, 8, 2)
    reference = total_loss(objective(big(objective.model_inputs(batch)), batch))
    reference.backward()
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    loss = accumulate(small, objective, micro)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=1e-12)
    got = _grads(small)
    assert any(k.startswith("heads.roi.") for k in got) and "clip.logit_scale" in got
    assert_same_tensors(got, _grads(big))


def test_temperature_starts_at_0_07_and_is_clamped_as_clips():
    objective, model, _ = _pyramid_model()
    assert model.clip.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    objective.after_step(model)
    assert model.clip.logit_scale.item() == pytest.approx(math.log(100))


PYRAMID = "objective.name=pyramidclip objective.pyramidclip.last_blocks=2"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            f"{PYRAMID} objective.pyramidclip.summary_source=json:abstract "
            "objective.pyramidclip.summary_fallback=",
            "field 'summary' (json key 'abstract') is missing in shard",
        ),
        (
            f"{PYRAMID} objective.pyramidclip.objects_key=detections",
            "field 'attributes' (json key 'detections') is missing in shard",
        ),
        (
            f"{PYRAMID} objective.pyramidclip.objects_key=detections",
            "; vlp shards attach SHARDS --jsonl RECORDS.jsonl --out OUT writes summaries and "
            "objects into copies of the shards",
        ),
        (f"{PYRAMID} model.name=convirt-RN50-minilm", "ResNets are not supported"),
        (f"{PYRAMID} objective.pyramidclip.mu=0.9", "lam + mu <= 1"),
    ],
)
def test_startup_names_what_is_missing(shards, tmp_path, capsys, override, message):  # noqa: F811
    from launch.cli import main

    args = ["train", "--check", "--config", str(DEMO), *_overrides(shards, tmp_path)]
    assert main([*args, *override.split(" ")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and error[-1].startswith("vlp: error: "), error


def test_a_missing_summary_falls_back_to_the_first_clause_and_is_counted(shards, tmp_path):  # noqa: F811
    from launch.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", str(DEMO), *_overrides(shards, out, **{"train.steps": 1})]
    args += [*PYRAMID.split(" "), "objective.pyramidclip.summary_source=json:abstract"]
    assert main(args) == 0
    log = (out / "metrics.jsonl").read_text()
    assert '"train/summary_fallback": 1.0' in log and '"train/L_rt"' in log


def _max_pooled_reference(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The official ``encode_text``, read off open_clip's own forward: the ``ln_final`` output
    at every position (a hook), its maximum over positions, then ``@ text_projection``."""
    seen = []
    handle = clip.ln_final.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        clip.encode_text(tokens)
    finally:
        handle.remove()
    return seen[0].max(dim=1).values @ clip.text_projection


def test_text_features_are_max_pooled_over_positions_then_projected_everywhere():
    """``text_pool=max`` (the default): summaries, captions, attribute texts and the model's
    ``encode_text`` (what zero-shot and retrieval call) equal the plain float64 reference and
    differ from the end-of-text token; ``eot`` is open_clip's own ``encode_text``."""
    objective, model, tokenizer = _pyramid_model()
    inputs = _inputs(tokenizer, 3, 1)
    inputs["caption"] = tokenizer(["a big red star", "small blue circle at left", "a square"])
    outputs = model(inputs)
    for text in ("summary", "caption", "attributes"):
        reference = F.normalize(_max_pooled_reference(model.clip, inputs[text]), dim=-1)
        torch.testing.assert_close(outputs[f"{text}_features"], reference, rtol=1e-12, atol=1e-12)
    tokens = inputs["caption"]
    reference = _max_pooled_reference(model.clip, tokens)
    torch.testing.assert_close(model.encode_text(tokens), reference, rtol=1e-12, atol=1e-12)
    eot = model.clip.encode_text(tokens)
    assert (model.encode_text(tokens) - eot).abs().max() > 1e-3
    _, eot_model, _ = _pyramid_model(text_pool="eot")
    torch.testing.assert_close(eot_model.encode_text(tokens), eot, rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_pool must be one of"):
        PyramidClipObjective(text_pool="mean")


def _roi_reference(visual, weight: torch.Tensor, regions: torch.Tensor, valid, last_blocks: int):
    """The official ROI branch, one sample at a time over its valid regions only:
    ln_pre([class_embedding, regions @ φ]) (no position embedding), the last blocks, ln_post of
    the first token, @ proj."""
    blocks = visual.transformer.resblocks[-last_blocks:]
    out = []
    for sample, keep in zip(regions, valid, strict=True):
        x = torch.cat([visual.class_embedding[None], sample[keep] @ weight.T])
        x = visual.ln_pre(x)[None]
        x = x if visual.transformer.batch_first else x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        x = x if visual.transformer.batch_first else x.transpose(0, 1)
        out.append(visual.ln_post(x[0, 0]) @ visual.proj)
    return torch.stack(out)


def test_roi_branch_is_the_official_one_class_embedding_bias_free_phi_and_ln_pre():
    objective, model, tokenizer = _pyramid_model(regions="npy", region_dim=7)
    assert sorted(model.heads.state_dict()) == ["roi.embed.weight"]  # no new CLS, no bias
    inputs = _inputs(tokenizer, 3, 3)
    inputs["regions"] = torch.randn(3, 3, 7, dtype=torch.float64)
    inputs["regions_mask"] = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():  # a non-trivial ln_pre, so that leaving it out would show
        model.clip.visual.ln_pre.weight.uniform_(0.5, 1.5)
        model.clip.visual.ln_pre.bias.normal_()
    roi = model(objective.model_inputs(inputs))["roi_features"]
    visual, weight = model.clip.visual, model.heads["roi"].embed.weight
    reference = _roi_reference(visual, weight, inputs["regions"], inputs["regions_mask"], 2)
    torch.testing.assert_close(roi, F.normalize(reference, dim=-1), rtol=1e-10, atol=1e-12)


def _pyramid_checkpoint(run: Path, settings: dict, heads: dict[str, torch.Tensor] | None) -> None:
    """A vlp-tiny-vit PyramidCLIP run checkpoint recording ``settings`` (and ``heads``)."""
    from safetensors.torch import save_file

    from tests.evals.conftest import save_run_checkpoint

    checkpoint = save_run_checkpoint(run, 1, _tiny_clip(), "vlp-tiny-vit")
    meta = json.loads((checkpoint / "model_config.json").read_text())
    meta["objective"] = {"name": "pyramidclip", "settings": settings}
    (checkpoint / "model_config.json").write_text(json.dumps(meta))
    if heads is not None:
        save_file(heads, str(checkpoint / "heads.safetensors"))


@functools.cache
def _tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vlp-tiny-vit")[0].eval()


def test_zero_shot_and_exports_pool_text_as_training_did_and_old_roi_heads_are_refused(tmp_path):
    """A run with the ROI branch, and an export of one without (no heads, yet it must record its
    pooling): zero-shot class embeddings are the max-pooled reference. A run recorded before
    ``text_pool`` existed is evaluated with the end-of-text token it trained with; one with the
    old ROI branch's parameters is refused in one line."""
    from evals.export import export_run
    from evals.loading import ModelLoadError, load_model
    from evals.zeroshot import build_class_embeddings

    settings = {"last_blocks": 2, "text_pool": "max"}
    _pyramid_checkpoint(tmp_path / "run", settings, {"roi.embed.weight": torch.randn(128, 128)})
    _pyramid_checkpoint(tmp_path / "no_roi", {**settings, "w_rs": 0.0, "w_rt": 0.0}, None)
    export = export_run(tmp_path / "no_roi", tmp_path / "export")
    assert "`text_pool=max`" in (export / "README.md").read_text()
    for reference in (tmp_path / "run", export):
        model, _, tokenizer, _ = load_model(reference)
        weights = build_class_embeddings(model, tokenizer, ["red star", "blue circle"], ("a {c}",))
        tokens = tokenizer(["a red star", "a blue circle"])
        expected = F.normalize(_max_pooled_reference(model.clip, tokens), dim=-1)
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    _pyramid_checkpoint(tmp_path / "old", {"last_blocks": 2}, None)
    assert not isinstance(load_model(tmp_path / "old").model, VlpModel)  # open_clip's pooling
    old_heads = {"roi.cls": torch.randn(128), "roi.embed.weight": torch.randn(128, 128)}
    _pyramid_checkpoint(tmp_path / "old_roi", {"last_blocks": 2}, old_heads)
    with pytest.raises(ModelLoadError, match=r"roi\.cls: a PyramidCLIP ROI branch saved by an "):
        load_model(tmp_path / "old_roi")
