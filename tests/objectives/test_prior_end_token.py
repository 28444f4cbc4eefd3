"""PRIOR's end-of-text token (``objective.prior.end_token``): ``fixed`` weighs it 1 and leaves it
out of the other tokens' normalisation; ``weighted`` is the formula for every token, bit for bit
what it was before the setting existed. Float64 throughout, against weights written out by hand."""

from __future__ import annotations

import pytest
import torch

from tests.objectives.test_prior_math import PAD, BigramLM, bigram_table, random_case
from vlp.objectives.prior import reference_target_logprobs, token_weights
from vlp.objectives.prior.objective import SIDECAR_KEY, PriorObjective, PriorSettings
from vlp.objectives.prior.weights import last_true


def weights_before_the_setting(logprobs: torch.Tensor, mask: torch.Tensor, alpha: float):
    """``token_weights`` as it was before ``end_token`` (every token weighted, the end too)."""
    weights = (-torch.expm1(logprobs)).pow(alpha)
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    total = weights.sum(dim=1, keepdim=True)
    count = mask.sum(dim=1, keepdim=True).to(weights.dtype)
    defined = total > 0
    normalised = count * weights / torch.where(defined, total, torch.ones_like(total))
    return torch.where(defined, normalised, mask.to(weights.dtype))


def fixed_end_by_hand(logprobs: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Caption by caption: the last real target weighs 1; the k − 1 before it get
    (k − 1)·w_i / Σ_j w_j with w = (1 − P_r)^α (uniform 1 when that sum is 0); padding 0."""
    expected = torch.zeros_like(logprobs)
    for c in range(logprobs.shape[0]):
        real = [i for i in range(logprobs.shape[1]) if mask[c, i]]
        if not real:
            continue
        *rest, end = real
        expected[c, end] = 1.0
        w = {i: (1.0 - float(logprobs[c, i].exp())) ** alpha for i in rest}
        total = sum(w.values())
        for i in rest:
            expected[c, i] = len(rest) * w[i] / total if total > 0 else 1.0
    return expected


def test_fixed_end_token_on_a_bigram_lm_by_hand():
    tokens = torch.tensor([[1, 2, 3, 4, PAD, PAD]])  # targets 2, 3, 4 (4 ends the caption)
    logprobs, mask = reference_target_logprobs(BigramLM(bigram_table()), tokens, pad_id=PAD)
    weights = token_weights(logprobs, mask, end_token="fixed")
    # end: 1; the others w = 1 − P_r = (0.5, 0.1), Σ = 0.6, k − 1 = 2: ŵ = (5/3, 1/3)
    expected = torch.tensor([[5 / 3, 1 / 3, 1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-15, atol=0)
    assert weights[0, 2].item() == 1.0 and weights[0, 3:].tolist() == [0.0, 0.0]
    # weighted, the end token takes 3·0.8/1.4 = 12/7 here (P_r(4|3) = 0.2 is low)
    torch.testing.assert_close(token_weights(logprobs, mask)[0, 2], torch.tensor(12 / 7).double())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed, b, length", [(s, 1 + s % 7, 1 + 5 * s % 31) for s in range(6)])
def test_fixed_end_token_weighs_one_and_the_rest_average_one(seed, b, length, alpha):
    labels, logprobs, _ = random_case(seed, b, length)
    mask = labels != PAD
    weights = token_weights(logprobs, mask, alpha, end_token="fixed")
    end = last_true(mask)
    assert (weights[end] == 1.0).all() and (weights[~mask] == 0).all()
    assert torch.equal(end.sum(dim=1), torch.ones(b, dtype=torch.long))  # every caption ≥ 1 token
    torch.testing.assert_close(
        weights, fixed_end_by_hand(logprobs, mask, alpha), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(weights.sum(dim=1) / mask.sum(dim=1), torch.ones(b).double())


def test_fixed_end_token_edge_cases():
    logprobs = torch.tensor(
        [[-0.5, -1.0, -2.0], [0.0, 0.0, -0.1], [-1.0, -1.0, -1.0], [-0.3, -0.2, -0.1]],
        dtype=torch.float64,
    )
    mask = torch.tensor(
        [[True, False, False], [True, True, True], [False] * 3, [True, True, False]]
    )
    weights = token_weights(logprobs, mask, end_token="fixed")
    assert weights[0].tolist() == [1.0, 0.0, 0.0]  # the end token alone
    assert weights[1].tolist() == [1.0, 1.0, 1.0]  # P_r = 1 before the end: uniform, not 0/0
    assert weights[2].tolist() == [0.0, 0.0, 0.0]  # nothing to weigh
    assert weights[3, 0].item() == 1.0 and weights[3, 1].item() == 1.0  # k − 1 = 1: ŵ = w/w


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed, b, length", [(s, 1 + s % 7, 2 + 5 * s % 31) for s in range(6)])
def test_weighted_end_token_is_the_formula_as_before_bit_for_bit(seed, b, length, alpha):
    labels, logprobs, _ = random_case(seed, b, length)
    mask = labels != PAD
    before = weights_before_the_setting(logprobs, mask, alpha)
    assert torch.equal(token_weights(logprobs, mask, alpha), before)
    assert torch.equal(token_weights(logprobs, mask, alpha, end_token="weighted"), before)


def test_an_unknown_end_token_choice_is_refused():
    with pytest.raises(ValueError, match="end_token must be one of"):
        token_weights(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), end_token="last")
    with pytest.raises(ValueError, match="end_token must be one of"):
        PriorSettings(end_token="last").validate()


@pytest.mark.parametrize("end_token", ["weighted", "fixed"])
def test_the_objective_applies_the_setting_to_a_sidecars_log_probabilities(end_token):
    """A sidecar stores log P_r, not weights: one sidecar serves both settings, the weights are
    made from it at loss time."""
    from vlp.models import create_model

    torch.manual_seed(0)
    clip, _, _, tokenizer = create_model("vlp-tiny-coca")
    objective = PriorObjective(alpha=1.0, end_token=end_token)
    model = objective.build_model(clip.double())
    text = tokenizer(["a small red star", "a large blue circle on dark", "a cross"])
    generator = torch.Generator().manual_seed(1)
    logprobs = torch.rand(3, text.shape[1] - 1, generator=generator, dtype=torch.float64).log()
    batch = {"image": torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64),
             "text": text, SIDECAR_KEY: logprobs}  # fmt: skip
    outputs = model(objective.model_inputs(batch))
    mask = text[:, 1:] != PAD
    expected = (fixed_end_by_hand(logprobs, mask, 1.0) if end_token == "fixed"
                else weights_before_the_setting(logprobs, mask, 1.0))  # fmt: skip
    torch.testing.assert_close(outputs["token_weights"], expected, rtol=1e-12, atol=0)
