"""The PRIOR objectives: ``prior`` equals CoCa's loss at α = 0 and without a reference, its
weights come from the frozen reference (kept out of parameters and checkpoints), caption logits
are never cached by GradCache while accumulation stays exact, and ``prior_reference`` trains
a text-only LM whose run ``prior`` loads (or refuses, naming why)."""

from __future__ import annotations

import gc
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from open_clip.loss import CoCaLoss
from safetensors.torch import load_file, save_file

from tests.training.test_gradcache import CPU, _grads, accumulate, assert_same_tensors
from vlp.models import create_model
from vlp.objectives import create_objective, total_loss
from vlp.objectives.prior.objective import PriorObjective, load_reference, load_reference_run
from vlp.objectives.prior.reference_lm import TinyCausalLM
from vlp.objectives.prior.weights import token_weights
from vlp.training.gradcache import cached_batch_loss

CAPTIONS = ["a small red star", "a large blue circle on dark", "a green square", "a cross"]


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model("vlp-tiny-coca")
    return model.double(), tokenizer


def reference_run(
    folder: Path, clip, seed: int = 3, model: str = "vlp-tiny-coca", tokenizer: str | None = None
) -> Path:
    """A minimal ``prior_reference`` run: one complete checkpoint with the LM as heads, and the
    run's config.yaml naming the model (and its SentencePiece ``tokenizer``)."""
    torch.manual_seed(seed)
    lm = TinyCausalLM(clip.text.vocab_size, clip.text.context_length, 32, 1, 4)
    checkpoint = folder / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    save_file({f"lm.{k}": v.contiguous() for k, v in lm.state_dict().items()},
              str(checkpoint / "heads.safetensors"))  # fmt: skip
    text_cfg = {"vocab_size": clip.text.vocab_size, "context_length": clip.text.context_length}
    (folder / "config.yaml").write_text(
        json.dumps({"model": {"name": model, "tokenizer": tokenizer}})
    )
    meta = {"model_name": model, "model_cfg": {"text_cfg": text_cfg},
            "objective": {"name": "prior_reference", "settings": {"width": 32, "layers": 1, "heads": 4}}}  # fmt: skip
    (checkpoint / "model_config.json").write_text(json.dumps(meta))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1}))
    from vlp.training.checkpoint import mark_complete

    mark_complete(checkpoint)
    return folder


def _batch(tokenizer, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(n)]
    return {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
            "text": tokenizer(texts)}  # fmt: skip


def _coca_loss(outputs):
    loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    return sum(
        loss(
            outputs["image_features"],
            outputs["text_features"],
            outputs["logits"],
            outputs["labels"],
            outputs["logit_scale"],
        )  # fmt: skip
    )


@pytest.mark.parametrize("settings", [{}, {"alpha": 0.0, "reference": "REF"}])
def test_without_reference_or_at_alpha_zero_it_is_cocas_loss(coca, tmp_path, settings):
    clip, tokenizer = coca
    if settings.get("reference"):
        settings = {**settings, "reference": str(reference_run(tmp_path / "ref", clip))}
    objective = create_objective("prior", **settings)
    model = objective.build_model(clip)
    batch = _batch(tokenizer)
    outputs = model(objective.model_inputs(batch))
    got = total_loss(objective(outputs, batch))
    torch.testing.assert_close(got, _coca_loss(outputs), rtol=1e-12, atol=0)


def test_the_log_says_where_p_r_comes_from_or_that_it_is_plain_coca(coca, tmp_path, caplog):
    clip, _ = coca
    reference = reference_run(tmp_path / "ref", clip)
    caplog.set_level(logging.INFO, logger="vlp.objectives.prior.objective")
    for settings in (
        {},
        {"alpha": 0.0, "reference": str(reference)},
        {"reference": str(reference)},
    ):
        create_objective("prior", **settings).build_model(clip)
    assert [r.getMessage() for r in caplog.records] == [
        "PRIOR: no objective.prior.reference, so every token weighs 1: plain CoCa",
        f"PRIOR: reference LM P_r loaded from {reference / 'checkpoints' / 'step_00000001'}",
        "PRIOR: objective.prior.alpha=0, so every token weighs 1: plain CoCa",
        f"PRIOR: reference LM P_r loaded from {reference / 'checkpoints' / 'step_00000001'}",
        f"PRIOR: token weights (1 - P_r)^1, end token fixed, P_r from the reference LM {reference}",
    ]


def prior_weights_reference(
    lm: torch.nn.Module, tokens: torch.Tensor, alpha: float, end_token: str = "weighted"
) -> torch.Tensor:
    """PRIOR's ŵ ``[b, L-1]`` written out from the paper (REFERENCES.md, "PRIOR"), in float64,
    caption by caption and token by token: target i of a caption is token i + 1 (CoCa's
    labels), predicted by P_r from tokens ≤ i; w_i = (1 − P_r(t_i | t_<i))^α over the
    caption's k non-padding (id 0) targets, ŵ_i = k·w_i / Σ_j w_j, and 0 on padding.
    ``end_token="fixed"``: the last target (the end-of-text token) weighs 1 and the formula runs
    over the k − 1 before it."""
    with torch.no_grad():
        logits = lm.double()(tokens)
    b, length = tokens.shape
    expected = torch.zeros(b, length - 1, dtype=torch.float64)
    for c in range(b):
        targets = [i for i in range(length - 1) if int(tokens[c, i + 1]) != 0]
        if end_token == "fixed":
            expected[c, targets.pop()] = 1.0
        w = {}
        for i in targets:
            p = float(torch.softmax(logits[c, i], dim=0)[int(tokens[c, i + 1])])
            w[i] = (1.0 - p) ** alpha
        for i in targets:
            expected[c, i] = len(targets) * w[i] / sum(w.values())
    return expected


@pytest.mark.parametrize("alpha, end_token", [(1.0, "weighted"), (2.0, "weighted"), (1.0, "fixed")])
def test_weights_come_from_the_frozen_reference_which_stays_out_of_the_model(
    coca, tmp_path, alpha, end_token
):
    """The token weights the model outputs equal the paper's formula computed by hand from the
    reference run's saved LM (loaded here from its file, run in float64), not from the
    implementation's ``token_weights``."""
    clip, tokenizer = coca
    reference = reference_run(tmp_path / "ref", clip)
    objective = PriorObjective(reference=str(reference), alpha=alpha, end_token=end_token)
    model = objective.build_model(clip)
    lm = model.frozen("reference")
    assert not any(p is q for p in model.parameters() for q in lm.parameters())
    assert not any("reference" in key for key in model.state_dict())
    assert all(not p.requires_grad for p in lm.parameters())
    batch = _batch(tokenizer)
    outputs = model(objective.model_inputs(batch))

    saved = load_file(str(reference / "checkpoints" / "step_00000001" / "heads.safetensors"))
    vocab, context = clip.text.vocab_size, clip.text.context_length
    p_r = TinyCausalLM(vocab, context, 32, 1, 4)
    p_r.load_state_dict({key.removeprefix("lm."): value for key, value in saved.items()})
    expected = prior_weights_reference(p_r, batch["text"], alpha, end_token)
    torch.testing.assert_close(outputs["token_weights"], expected, rtol=1e-5, atol=1e-6)
    mask = batch["text"][:, 1:] != 0
    assert torch.equal(mask, outputs["labels"] != 0)
    assert not torch.allclose(expected[mask], torch.ones(int(mask.sum())).double())


def test_caption_logits_are_never_cached_and_accumulation_is_exact(coca, tmp_path):
    clip, tokenizer = coca
    reference = str(reference_run(tmp_path / "ref", clip))
    objective = PriorObjective(reference=reference)
    torch.manual_seed(0)
    big = objective.build_model(create_model("vlp-tiny-coca")[0].double())
    torch.manual_seed(0)
    small = objective.build_model(create_model("vlp-tiny-coca")[0].double())
    small.load_state_dict(big.state_dict())
    batch = _batch(tokenizer, 8)
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    cached = cached_batch_loss(small, objective, micro, autocast=nullcontext, device=CPU)
    assert set(cached.grads) == {"image_features", "text_features", "logit_scale"}
    assert set(cached.shared) == {"logit_scale"}  # no [b, L, V] logits kept across micro-batches
    vocab = clip.text.vocab_size
    alive_during_coupled_loss = []

    def batch_loss(features):  # step (2): every micro-batch encoded, the coupled loss next
        gc.collect()
        alive_during_coupled_loss.extend(
            o.shape
            for o in gc.get_objects()
            if torch.is_tensor(o) and o.ndim == 3 and o.shape[-1] == vocab
        )
        return PriorObjective.batch_loss(objective, features)

    objective.batch_loss = batch_loss  # type: ignore[method-assign]
    cached_batch_loss(small, objective, micro, autocast=nullcontext, device=CPU)
    assert alive_during_coupled_loss == []  # not k x [b, L, V], not even one micro-batch's
    small.zero_grad()
    # the caption term is per micro-batch: k = 4 of 2 equals one batch of 8 only for the
    # contrastive part, so compare with the caption weight at 0 for gradients of the whole loss
    contrastive = PriorObjective(reference=reference, caption_weight=0.0)
    total_loss(contrastive(big(contrastive.model_inputs(batch)), batch)).backward()
    accumulate(small, contrastive, micro)
    assert_same_tensors(_grads(small), _grads(big))


def test_a_reference_of_another_vocabulary_or_objective_is_refused(coca, tmp_path):
    clip, _ = coca
    run = reference_run(tmp_path / "ref", clip)
    meta_file = run / "checkpoints" / "step_00000001" / "model_config.json"
    meta = json.loads(meta_file.read_text())
    meta["model_cfg"]["text_cfg"]["vocab_size"] = 1000
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="P_r must use the captioning model's tokenizer"):
        load_reference_run(run, clip)
    meta["objective"]["name"] = "clip"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not prior_reference"):
        load_reference_run(run, clip)
    with pytest.raises(ValueError, match="needs a CoCa model"):
        PriorObjective().build_model(create_model("vlp-tiny-vit")[0])


def test_a_reference_run_that_read_its_captions_with_another_tokenizer_is_refused(tmp_path):
    """The vocabulary size and context agree (the run records 192), the pieces do not: the
    file must be the one the captioning model reads (its bytes), or both must use the model's
    own tokenizer."""
    import sentencepiece as spm

    from data_pipelines.procedural_tokenizer import train_procedural_tokenizer
    from data_pipelines.synthetic import generate_samples

    clip, _, _, tokenizer = create_model("vlp-tiny-coca-procedural", tokenizer="vlp:procedural-bpe")
    kw = {"model": "vlp-tiny-coca-procedural"}
    same = reference_run(tmp_path / "same", clip, tokenizer="vlp:procedural-bpe", **kw)
    assert isinstance(load_reference(same, clip, tokenizer), TinyCausalLM)
    other = tmp_path / "other.model"
    spm.SentencePieceTrainer.train(  # a unigram model of the same captions: other pieces
        sentence_iterator=(sample["txt"] for sample in generate_samples(400, seed=3)), vocab_size=64,
        model_prefix=str(other.with_suffix("")), pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        minloglevel=2,
    )  # fmt: skip
    assert other.read_bytes() != train_procedural_tokenizer()
    for name, run_tokenizer in (("own", None), ("other", str(other))):
        run = reference_run(tmp_path / name, clip, tokenizer=run_tokenizer, **kw)
        with pytest.raises(ValueError, match="P_r must use the captioning model's tokenizer"):
            load_reference(run, clip, tokenizer)
    assert isinstance(load_reference(run, clip, None), TinyCausalLM)  # nothing to check against


def test_the_reference_objective_trains_a_text_only_lm(coca):
    clip, tokenizer = coca
    torch.manual_seed(0)
    objective = create_objective("prior_reference", width=32, layers=1, heads=4)
    model = objective.build_model(create_model("vlp-tiny-coca")[0])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("heads.lm.") for name in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = {"text": tokenizer(CAPTIONS), "image": torch.zeros(4, 3, 32, 32)}
    losses = []
    for _ in range(30):
        loss = total_loss(objective(model(objective.model_inputs(batch)), batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_transformers_causal_lm_is_a_reference_when_its_tokenizer_is_the_models(coca, tmp_path):
    """objective.prior.reference may name a transformers causal LM (here a local GPT-2 over
    open_clip's vocabulary): its weights are used, checked against the captioning tokenizer;
    without that tokenizer, or with another one, it is refused in one line."""
    from tests.objectives.test_prior_math import write_clip_tokenizer, write_gpt2
    from vlp.objectives.prior.reference_lm import HFCausalLM, TokenizerMismatchError
    from vlp.objectives.prior.weights import reference_target_logprobs

    clip, tokenizer = coca
    write_gpt2(tmp_path / "gpt2", write_clip_tokenizer(tmp_path / "tok"))
    objective = PriorObjective(reference=str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="needs the captioning model's tokenizer"):
        objective.build_model(clip)
    objective.use_tokenizer(tokenizer)
    model = objective.build_model(clip)
    lm = model.frozen("reference")
    assert isinstance(lm, HFCausalLM) and not any("reference" in k for k in model.state_dict())
    batch = _batch(tokenizer)
    outputs = model(objective.model_inputs(batch))
    logprobs, mask = reference_target_logprobs(lm, batch["text"], 0)
    expected = token_weights(logprobs.double(), mask, 1.0)
    torch.testing.assert_close(outputs["token_weights"], expected, rtol=1e-5, atol=1e-6)

    write_gpt2(tmp_path / "other", write_clip_tokenizer(tmp_path / "swap", swap=(320, 321)))
    other = PriorObjective(reference=str(tmp_path / "other"))
    other.use_tokenizer(tokenizer)
    with pytest.raises(TokenizerMismatchError, match="at id 320"):
        other.build_model(clip)
    missing = PriorObjective(reference=str(tmp_path / "nowhere"))
    missing.use_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="neither a prior_reference run nor"):
        missing.build_model(clip)
