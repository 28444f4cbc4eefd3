"""PRIOR's building blocks: token weights against a hand computation on a bigram reference LM,
their normalisation, α = 0 as open_clip's CoCa caption loss bit for bit, gradient flow, the
tiny CoCa config, and the reference-LM tokenizer check."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.loss import CoCaLoss
from torch import nn

from vlp.models import create_model
from vlp.objectives.prior import (
    TinyCausalLM,
    TokenizerMismatchError,
    check_same_tokenizer,
    load_reference_lm,
    reference_target_logprobs,
    token_weights,
    weighted_caption_loss,
)

PAD = 0
CAPTIONS = ["a red square on black", "a small blue circle", "two green triangles", "a star"]


class BigramLM(nn.Module):
    """P_r(t_i | t_<i) = table[t_{i-1}, t_i]: a causal LM whose probabilities are known."""

    def __init__(self, probabilities: torch.Tensor) -> None:
        super().__init__()
        self.log_table = nn.Parameter(probabilities.log())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.log_table[tokens]


def bigram_table() -> torch.Tensor:
    """5 tokens (0 = pad); the rows the test caption 1 → 2 → 3 → 4 uses are set by hand."""
    table = torch.full((5, 5), 0.25, dtype=torch.float64)
    table[:, 0] = 0.0
    table[1] = torch.tensor([0.0, 0.1, 0.5, 0.2, 0.2], dtype=torch.float64)  # P(2|1) = 0.5
    table[2] = torch.tensor([0.0, 0.04, 0.03, 0.9, 0.03], dtype=torch.float64)  # P(3|2) = 0.9
    table[3] = torch.tensor([0.0, 0.4, 0.3, 0.1, 0.2], dtype=torch.float64)  # P(4|3) = 0.2
    return table


def prior_loss_reference(logits, labels, weights, pad_id):
    """L_PRIOR written out: Σ ŵ_i · (−log p(t_i | ...)) over non-pad labels / their number."""
    logprobs = logits.log_softmax(dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    real = labels != pad_id
    return -(weights * logprobs)[real].sum() / real.sum()


def random_case(seed: int, b: int, length: int, vocab: int = 13):
    """Right-padded labels (every caption ≥ 1 real token), log-probs ≤ 0, logits, float64."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=generator)
    labels = torch.randint(1, vocab, (b, length), generator=generator)
    labels[torch.arange(length) >= lengths[:, None]] = PAD
    logprobs = torch.rand(b, length, generator=generator, dtype=torch.float64).log()
    logits = torch.randn(b, length, vocab, generator=generator, dtype=torch.float64) * 3
    return labels, logprobs, logits


@pytest.fixture(scope="module")
def tiny_coca():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model("vlp-tiny-coca")
    # open_clip 3.3.0 never initialises CoCa's decoder output projection (torch.empty: zeros or
    # garbage, open_clip issue #554); zeros would give the image tower no caption gradient
    nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    return model.double(), tokenizer


def test_weights_match_a_hand_computation_on_a_bigram_lm():
    tokens = torch.tensor([[1, 2, 3, 4, PAD, PAD]])
    logprobs, mask = reference_target_logprobs(BigramLM(bigram_table()), tokens, pad_id=PAD)
    assert mask.tolist() == [[True, True, True, False, False]]
    torch.testing.assert_close(logprobs[0, :3], torch.tensor([0.5, 0.9, 0.2]).double().log())
    # w = 1 − P_r = (0.5, 0.1, 0.8), Σ = 1.4, k = 3: ŵ = 3·w/1.4 = (15, 3, 24)/14
    expected = torch.tensor([[15 / 14, 3 / 14, 24 / 14, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(token_weights(logprobs, mask), expected)
    # α = 2: w² = (0.25, 0.01, 0.64), Σ = 0.9, ŵ = 3·w²/0.9
    squared = torch.tensor([[0.75 / 0.9, 0.03 / 0.9, 1.92 / 0.9, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(token_weights(logprobs, mask, alpha=2.0), squared)


def test_reference_logprobs_align_with_cocas_labels(tiny_coca):
    model, tokenizer = tiny_coca
    tokens = tokenizer(CAPTIONS)
    outputs = model(torch.rand(len(CAPTIONS), 3, 32, 32, dtype=torch.float64), tokens)
    lm = TinyCausalLM(vocab_size=49408, context_length=tokens.shape[1]).double()
    logprobs, mask = reference_target_logprobs(lm, tokens, pad_id=model.pad_id)
    assert logprobs.shape == outputs["logits"].shape[:2] == outputs["labels"].shape
    assert torch.equal(mask, outputs["labels"] != model.pad_id)
    # target i of caption b is tokens[b, i + 1], predicted from tokens[b, i]
    expected = lm(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert torch.equal(logprobs, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed, b, length", [(s, 1 + s % 7, 2 + 5 * s % 31) for s in range(12)])
def test_weights_average_one_per_caption_and_vanish_on_padding(seed, b, length, alpha):
    labels, logprobs, _ = random_case(seed, b, length)
    mask = labels != PAD
    weights = token_weights(logprobs, mask, alpha=alpha)
    assert (weights >= 0).all() and torch.isfinite(weights).all()
    assert (weights[~mask] == 0).all()
    per_caption = weights.sum(dim=1) / mask.sum(dim=1)
    torch.testing.assert_close(per_caption, torch.ones(b, dtype=torch.float64))


def test_alpha_zero_is_uniform_even_where_the_reference_is_certain():
    logprobs = torch.tensor([[0.0, -0.3, 0.0, -2.0]], dtype=torch.float64)  # P_r = 1 at 0 and 2
    mask = torch.tensor([[True, True, True, False]])
    assert token_weights(logprobs, mask, alpha=0.0).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_a_caption_the_reference_predicts_with_certainty_falls_back_to_uniform():
    logprobs = torch.tensor([[0.0, 0.0, -1.0], [-0.5, -1.0, -0.1], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    weights = token_weights(logprobs, mask)
    assert weights[0].tolist() == [1.0, 1.0, 0.0]  # all w = 0: uniform, not 0/0
    assert weights[2].tolist() == [0.0, 0.0, 0.0]  # no real token: nothing to weigh
    torch.testing.assert_close(weights[1].mean(), torch.tensor(1.0))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        token_weights(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), alpha=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        token_weights(torch.zeros(1, 3), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must be \[b, L, V\]"):
        weighted_caption_loss(torch.zeros(1, 3, 5), torch.ones(1, 3).long(), torch.ones(1, 4), 0)


@pytest.mark.parametrize("seed, b, length", [(s, 1 + s % 9, 2 + 7 * s % 40) for s in range(30)])
def test_all_ones_weights_equal_cocas_caption_loss_bit_for_bit(seed, b, length):
    labels, _, logits = random_case(seed, b, length, vocab=97)
    coca = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=PAD)
    _, reference = coca(None, None, logits, labels, None)
    ours = weighted_caption_loss(logits, labels, torch.ones_like(logits[..., 0]), PAD)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("seed, b, length", [(s, 1 + s % 5, 2 + 3 * s % 20) for s in range(8)])
def test_weighted_loss_matches_the_formula_forward_and_backward(seed, b, length):
    labels, logprobs, logits = random_case(seed, b, length)
    weights = token_weights(logprobs, labels != PAD)
    ours_logits, ref_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = weighted_caption_loss(ours_logits, labels, weights, PAD)
    reference = prior_loss_reference(ref_logits, labels, weights, PAD)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-10, atol=1e-12)


def test_alpha_zero_gives_the_plain_coca_caption_loss_on_the_tiny_coca(tiny_coca):
    model, tokenizer = tiny_coca
    tokens = tokenizer(CAPTIONS)
    outputs = model(torch.rand(len(CAPTIONS), 3, 32, 32, dtype=torch.float64), tokens)
    lm = TinyCausalLM(vocab_size=49408, context_length=tokens.shape[1]).double()
    logprobs, mask = reference_target_logprobs(lm, tokens, pad_id=model.pad_id)
    weights = token_weights(logprobs, mask, alpha=0.0)
    ours = weighted_caption_loss(outputs["logits"], outputs["labels"], weights, model.pad_id)
    coca = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0, pad_id=model.pad_id)
    _, reference = coca(
        outputs["image_features"],
        outputs["text_features"],
        outputs["logits"],
        outputs["labels"],
        outputs["logit_scale"],
    )
    assert ours.dtype == torch.float64
    assert torch.equal(ours, reference)
    prior = token_weights(logprobs, mask, alpha=1.0)
    assert weighted_caption_loss(outputs["logits"], outputs["labels"], prior, 0) != reference


def test_gradients_reach_the_captioner_and_not_the_reference_lm(tiny_coca):
    model, tokenizer = tiny_coca
    tokens = tokenizer(CAPTIONS)
    lm = TinyCausalLM(vocab_size=49408, context_length=tokens.shape[1]).double()
    logprobs, mask = reference_target_logprobs(lm, tokens, pad_id=model.pad_id)
    assert not logprobs.requires_grad
    model.zero_grad()
    outputs = model(torch.rand(len(CAPTIONS), 3, 32, 32, dtype=torch.float64), tokens)
    loss = weighted_caption_loss(
        outputs["logits"], outputs["labels"], token_weights(logprobs, mask), model.pad_id
    )
    loss.backward()
    assert model.text_decoder.text_projection.grad.abs().sum() > 0
    assert model.visual.conv1.weight.grad.abs().sum() > 0  # through the decoder's cross-attention
    assert all(p.grad is None for p in lm.parameters())


def test_tiny_coca_builds_offline_and_forwards(tiny_coca):
    model, tokenizer = tiny_coca
    assert type(model).__name__ == "CoCa"
    assert tokenizer.vocab_size == 49408 and tokenizer.context_length == 32
    tokens = tokenizer(CAPTIONS)
    outputs = model(torch.rand(len(CAPTIONS), 3, 32, 32, dtype=torch.float64), tokens)
    assert outputs["image_features"].shape == outputs["text_features"].shape == (4, 64)
    assert outputs["logits"].shape == (4, 31, 49408)
    assert torch.equal(outputs["labels"], tokens[:, 1:])
    # two 49408 × 64 tables (token embedding, decoder output) are 6.32 M of the 6.77 M
    assert sum(p.numel() for p in model.parameters()) < 7_000_000


def test_tiny_causal_lm_is_causal():
    torch.manual_seed(0)
    lm = TinyCausalLM(vocab_size=50, context_length=12)
    tokens = torch.randint(1, 50, (3, 12))
    changed = tokens.clone()
    changed[:, 7:] = torch.randint(1, 50, (3, 5))
    logits = lm(tokens)
    assert logits.shape == (3, 12, 50)
    torch.testing.assert_close(lm(changed)[:, :7], logits[:, :7])


def write_clip_tokenizer(folder: Path, swap: tuple[int, int] | None = None):
    """open_clip's BPE vocabulary as a Hugging Face CLIPTokenizer (its own special-token names),
    optionally with two tokens' ids swapped."""
    from transformers import CLIPTokenizer

    simple = open_clip.SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    if swap:
        names = {i: t for t, i in vocab.items()}
        vocab[names[swap[0]]], vocab[names[swap[1]]] = swap[1], swap[0]
    bpe = Path(open_clip.tokenizer.default_bpe())
    with gzip.open(bpe, "rt", encoding="utf-8") as lines:  # the slice open_clip's tokenizer reads
        merges = lines.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def write_gpt2(folder: Path, tokenizer) -> None:
    """A 1-layer GPT-2 over ``tokenizer``'s vocabulary, saved with it (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_reference_lm_with_another_vocabulary_is_refused(tmp_path, tiny_coca):
    from transformers import GPT2Tokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<eos>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    theirs = GPT2Tokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), unk_token="<eos>"
    )
    write_gpt2(tmp_path / "lm", theirs)
    with pytest.raises(TokenizerMismatchError) as refused:
        load_reference_lm(tmp_path / "lm", tiny_coca[1])
    message = str(refused.value)
    assert "\n" not in message and f"has {len(theirs)} tokens" in message and "49408" in message


def test_a_reference_lm_with_our_vocabulary_loads_and_a_reordered_one_is_refused(
    tmp_path, tiny_coca
):
    ours = tiny_coca[1]
    check_same_tokenizer(ours, write_clip_tokenizer(tmp_path / "same"))  # special names differ
    with pytest.raises(TokenizerMismatchError, match=r"at id 320 \(theirs '.*', ours 'a</w>'\)"):
        check_same_tokenizer(ours, write_clip_tokenizer(tmp_path / "swapped", swap=(320, 321)))

    write_gpt2(tmp_path / "lm", write_clip_tokenizer(tmp_path / "same"))
    lm = load_reference_lm(tmp_path / "lm", ours)
    assert not any(p.requires_grad for p in lm.parameters()) and not lm.model.training
    tokens = ours(CAPTIONS)
    logprobs, mask = reference_target_logprobs(lm, tokens, pad_id=PAD)
    assert logprobs.shape == mask.shape == (4, 31)
    # right padding needs no attention mask: other tokens after a caption change nothing in it
    noisy = torch.where(tokens == PAD, torch.randint(1, 49408, tokens.shape), tokens)
    noisy_logprobs, _ = reference_target_logprobs(lm, noisy, pad_id=PAD)
    torch.testing.assert_close(noisy_logprobs[mask], logprobs[mask])
