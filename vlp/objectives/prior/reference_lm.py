"""PRIOR's reference LM P_r: a text-only causal LM over the captioning model's tokenizer.

PRIOR (Chen et al. 2025, arXiv 2505.08971) weighs each caption token by 1 − P_r(t_i | t_<i),
where P_r is "a text-only LM trained on the same captions without images, using the captioning
model's tokenizer". Two sources here, both mapping tokens ``[b, L]`` to logits ``[b, L, V]``:

- :class:`TinyCausalLM`: open_clip's ``TextTransformer`` (causal mask, the architecture of
  CoCa's own text tower) with a vocabulary head, for CPU tests and small runs;
- :func:`load_reference_lm`: any Hugging Face causal LM saved in a local folder, accepted only
  when its tokenizer is ours (:func:`check_same_tokenizer`): P_r's token ids must mean the same
  tokens as the captioning model's, or the weights are silently wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import TextTransformer
from torch import nn

from vlp.models.vocabulary import vocabulary


class TokenizerMismatchError(ValueError):
    """The reference LM's tokenizer maps ids to other tokens than the captioning model's."""


class TinyCausalLM(nn.Module):
    """A small causal transformer LM: tokens ``[b, L]`` → next-token logits ``[b, L, V]``.

    ``vocab_size`` and ``context_length`` must be the captioning model's (``text_cfg``), so
    that the LM reads the same token ids. Position j sees tokens ≤ j only.

    Example::

        lm = TinyCausalLM(vocab_size=49408, context_length=32)
        logits = lm(tokenizer(["a red square"]))  # [1, 32, 49408]
    """

    def __init__(
        self, vocab_size: int, context_length: int, width: int = 64, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=None,  # no pooled embedding: only the per-token states are used
            pool_type="last",
            output_tokens=True,
        )
        self.head = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, L, V]``; position j predicts token j + 1."""
        _, states = self.text(tokens)  # states after the final LayerNorm, [b, L, width]
        return self.head(states)


class HFCausalLM(nn.Module):
    """A frozen Hugging Face causal LM behind the tokens → logits interface of P_r.

    No attention mask is passed: captions are right-padded (open_clip's tokenizers), and a
    causal LM's logits at real positions never see the padding after them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, L, V]`` of the wrapped model."""
        logits: torch.Tensor = self.model(input_ids=tokens).logits
        return logits


def load_reference_lm(path: str | Path, tokenizer: Any) -> HFCausalLM:
    """Load a causal LM and its tokenizer from a local folder (``save_pretrained`` layout) or a
    hub name, refusing it unless its tokenizer is ``tokenizer`` (the captioning model's).

    A local folder is read without any download (``local_files_only``); a hub name is fetched
    by transformers (its cache, or the network). Raises :class:`TokenizerMismatchError` when the
    vocabularies disagree or the LM predicts fewer ids than the tokenizer has; ``OSError`` when
    nothing loads.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).is_dir()
    theirs = AutoTokenizer.from_pretrained(path, local_files_only=local)
    check_same_tokenizer(tokenizer, theirs)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local)
    outputs = model.get_output_embeddings().weight.shape[0]
    if outputs < len(vocabulary(tokenizer)):
        raise TokenizerMismatchError(
            f"reference LM at '{path}' predicts {outputs} token ids but the tokenizer has "
            f"{len(vocabulary(tokenizer))}; use an LM trained with the captioning tokenizer"
        )
    return HFCausalLM(model)


def check_same_tokenizer(ours: Any, theirs: Any) -> None:
    """Raise :class:`TokenizerMismatchError` (one line) unless both tokenizers map every id to
    the same token.

    Accepts open_clip tokenizers (``SimpleTokenizer``, ``HFTokenizer``) and Hugging Face ones.
    Special tokens are matched by id, not by name, since libraries spell them differently
    (open_clip's ``<start_of_text>`` is Hugging Face CLIP's ``<|startoftext|>``): an id special
    in both counts as the same token.
    """
    our_vocab, their_vocab = vocabulary(ours), vocabulary(theirs)
    if len(our_vocab) != len(their_vocab):
        raise TokenizerMismatchError(
            f"reference LM tokenizer has {len(their_vocab)} tokens, the captioning model's "
            f"{len(our_vocab)}; P_r must use the captioning model's tokenizer"
        )
    specials = _special_ids(ours) & _special_ids(theirs)
    our_tokens = {token_id: token for token, token_id in our_vocab.items()}
    their_tokens = {token_id: token for token, token_id in their_vocab.items()}
    for token_id in sorted(our_tokens.keys() | their_tokens.keys()):
        mine, other = our_tokens.get(token_id), their_tokens.get(token_id)
        if mine != other and token_id not in specials:
            raise TokenizerMismatchError(
                f"reference LM tokenizer differs from the captioning model's at id {token_id} "
                f"(theirs {other!r}, ours {mine!r}); P_r must use the captioning model's tokenizer"
            )


def _special_ids(tokenizer: Any) -> set[int]:
    inner = getattr(tokenizer, "tokenizer", None)
    source = inner if hasattr(inner, "all_special_ids") else tokenizer
    return set(getattr(source, "all_special_ids", ()))
