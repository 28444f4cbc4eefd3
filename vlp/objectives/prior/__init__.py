"""PRIOR (Chen et al. 2025, arXiv 2505.08971) for a CoCa-style model: token weights from a
frozen text-only reference LM, the re-weighted caption loss, and the objectives ``prior`` and
``prior_reference`` (:mod:`vlp.objectives.prior.objective`).
"""

from vlp.objectives.prior.reference_lm import (
    HFCausalLM,
    TinyCausalLM,
    TokenizerMismatchError,
    check_same_tokenizer,
    load_reference_lm,
)
from vlp.objectives.prior.weights import (
    reference_target_logprobs,
    token_weights,
    weighted_caption_loss,
)

__all__ = [
    "HFCausalLM",
    "TinyCausalLM",
    "TokenizerMismatchError",
    "check_same_tokenizer",
    "load_reference_lm",
    "reference_target_logprobs",
    "token_weights",
    "weighted_caption_loss",
]
