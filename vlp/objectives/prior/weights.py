"""PRIOR's token weights and the weighted caption loss (Chen et al. 2025, arXiv 2505.08971).

PRIOR replaces next-token prediction's plain sum L_NTP = −Σ_i log p(t_i | v, t_<i) with

    L_PRIOR = −Σ_i ŵ_i · log p(t_i | v, t_<i),   ŵ_i = k · w_i / Σ_j w_j,
    w_i = (1 − P_r(t_i | t_<i))^α

over the k tokens of a caption (the paper; the official repo's README figure shows α = 1), where
P_r is a text-only reference LM with the captioning model's tokenizer: tokens the text alone
predicts well (function words, the rest of a common phrase) get little weight, tokens that need
the image get more. ŵ has mean 1
per caption, so the loss keeps NTP's scale. The paper sets its exponent α "empirically" to 1,
vlp's default; α = 0 is plain NTP.

Alignment follows open_clip's CoCa: ``CoCa.forward`` predicts ``labels = text[:, 1:]`` from
``text[:, :-1]`` and ``CoCaLoss`` averages ``CrossEntropyLoss(ignore_index=pad_id)`` over the
non-padding labels of the whole batch; :func:`weighted_caption_loss` averages the same way, so
all-ones weights give CoCa's caption term exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

END_TOKEN_CHOICES = ("weighted", "fixed")
"""How PRIOR weighs a caption's end-of-text token (``objective.prior.end_token``)."""


def token_weights(
    ref_logprobs_of_targets: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    end_token: str = "weighted",
) -> torch.Tensor:
    """PRIOR's normalised weights ŵ ``[b, L]`` from log P_r of each target token ``[b, L]``.

    w_i = (1 − P_r(t_i | t_<i))^α on the positions where ``mask`` (bool ``[b, L]``) is True;
    ŵ_i = k · w_i / Σ_j w_j over a caption's k masked-in tokens (mean 1 per caption), 0 on
    padding. 1 − P_r is computed as −expm1(log P_r), exact where P_r is close to 1.

    ``end_token`` ("weighted" or "fixed") is how the end-of-text token, a caption's last
    masked-in position, is weighed. "weighted": like any token (the formula above). "fixed":
    its ŵ is 1 and it is left out of the normalisation, the other k − 1 tokens get
    ŵ_i = (k − 1) · w_i / Σ_{j≠end} w_j, so the caption's mean stays 1. The paper does not say how
    it treats special tokens; a reference LM predicts the end token almost surely on regular
    captions, so weighted it gets little weight and the captioner learns late to stop. Every
    tokenizer vlp uses ends each row with its end token, truncated rows included (open_clip's
    SimpleTokenizer, :class:`vlp.models.tokenizers.SentencePieceTokenizer`).

    A caption whose weights are all 0 (P_r = 1 on every token, α > 0) has no defined ŵ (0/0);
    it falls back to uniform weights 1, i.e. that caption's plain NTP loss, rather than NaN.
    ``alpha`` = 0 gives 1 on every real token (0^0 = 1), i.e. plain NTP.

    Example::

        logp, mask = reference_target_logprobs(reference_lm, tokens, pad_id=0)
        weights = token_weights(logp, mask)  # [b, L - 1], rows of real tokens average 1
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (an exponent on 1 - P_r), got {alpha}")
    if end_token not in END_TOKEN_CHOICES:
        raise ValueError(f"end_token must be one of {END_TOKEN_CHOICES}, got '{end_token}'")
    if ref_logprobs_of_targets.shape != mask.shape:
        raise ValueError(
            f"ref_logprobs_of_targets {tuple(ref_logprobs_of_targets.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape [b, L]"
        )
    mask = mask.bool()
    weights = (-torch.expm1(ref_logprobs_of_targets)).pow(alpha)
    if end_token == "weighted":
        return _normalised(weights, mask)
    end = last_true(mask)
    return torch.where(end, torch.ones_like(weights), _normalised(weights, mask & ~end))


def _normalised(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k · w / Σw over each row's k masked-in positions, 0 elsewhere; a row whose masked-in
    weights are all 0 gets 1 on each of them (see :func:`token_weights`)."""
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    total = weights.sum(dim=1, keepdim=True)
    count = mask.sum(dim=1, keepdim=True).to(weights.dtype)
    defined = total > 0
    normalised = count * weights / torch.where(defined, total, torch.ones_like(total))
    return torch.where(defined, normalised, mask.to(weights.dtype))


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[b, L]``: True at each row's last True of ``mask`` (a caption's end-of-text
    target when ``mask`` marks its non-padding labels); rows without one stay all False."""
    mask = mask.bool()
    seen = mask.cumsum(dim=1)
    return mask & (seen == seen[:, -1:])


@torch.no_grad()
def reference_target_logprobs(
    lm: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P_r(t_i | t_<i) of each next-token target, and the mask of non-padding targets.

    ``lm`` maps tokens ``[b, L]`` to logits ``[b, L, V]`` (a causal LM: position j sees tokens
    ≤ j). Targets are aligned like open_clip's CoCa caption loss: ``labels = tokens[:, 1:]``,
    predicted from the logits at positions ``0 .. L-2``, and ``pad_id`` labels are masked out.
    The LM runs without grad: P_r is a frozen reference, its weights are constants. Half
    precision logits are promoted to float32 before the log-softmax.

    Returns ``(logprobs [b, L-1], mask [b, L-1] bool)``; logprobs at padding are whatever the LM
    gave there and must be ignored through the mask.
    """
    logits = lm(tokens)
    if logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"the reference LM returned logits {tuple(logits.shape)} for tokens "
            f"{tuple(tokens.shape)}; expected [b, L, V] with the same b and L"
        )
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    labels = tokens[:, 1:]
    logprobs = logits.log_softmax(dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logprobs, labels != pad_id


def weighted_caption_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, pad_id: int
) -> torch.Tensor:
    """L_PRIOR averaged like open_clip's ``CoCaLoss`` caption term: Σ ŵ_i · (−log p(t_i | ...))
    over the batch's non-``pad_id`` labels, divided by their number.

    ``logits`` ``[b, L, V]`` and ``labels`` ``[b, L]`` as CoCa's forward returns them;
    ``weights`` ``[b, L]`` from :func:`token_weights`, treated as constants (detached: PRIOR
    re-weights the captioning loss, it does not train P_r). With all-ones weights this equals
    ``CoCaLoss``'s unscaled caption loss (``CrossEntropyLoss(ignore_index=pad_id)``).
    """
    if weights.shape != labels.shape or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weights "
            f"{tuple(weights.shape)} must be [b, L, V], [b, L] and [b, L]"
        )
    # CrossEntropyLoss is log_softmax + nll_loss; scaling the target log-probs by ŵ and handing
    # them to the same nll_loss kernel (mean over non-ignored positions) keeps its summation
    # order, so all-ones weights reproduce CoCaLoss bit for bit, not only to rounding.
    target_logprobs = logits.permute(0, 2, 1).log_softmax(dim=1).gather(1, labels.unsqueeze(1))
    targets = torch.where(labels != pad_id, 0, -100)  # class 0 of the [b, 1, L] input, or ignored
    return F.nll_loss(target_logprobs * weights.detach().unsqueeze(1), targets, ignore_index=-100)
