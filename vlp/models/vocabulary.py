"""A tokenizer's vocabulary (token -> id), and a short stable name for it.

Files of token-aligned rows (PRIOR's ``vlp prior weights`` sidecar: one log-probability per
caption token) are only meaningful for the vocabulary that made them: the start-up check of any
objective with such a sidecar (``Objective.tokenized_sidecars``) compares the name the file
recorded with the run tokenizer's, and PRIOR refuses a reference LM of another vocabulary. Both
read the vocabulary here, for open_clip's and Hugging Face's tokenizers alike.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def vocabulary(tokenizer: Any) -> dict[str, int]:
    """Token -> id of an open_clip or Hugging Face tokenizer.

    Raises:
        TypeError: a tokenizer of a kind whose vocabulary cannot be read.
    """
    if hasattr(tokenizer, "get_vocab"):  # Hugging Face
        vocab: dict[str, int] = tokenizer.get_vocab()
        return vocab
    if hasattr(getattr(tokenizer, "tokenizer", None), "get_vocab"):  # open_clip HFTokenizer
        return vocabulary(tokenizer.tokenizer)
    if isinstance(getattr(tokenizer, "encoder", None), dict):  # open_clip SimpleTokenizer
        return dict(tokenizer.encoder)
    raise TypeError(f"cannot read the vocabulary of a {type(tokenizer).__name__}")


def tokenizer_identity(tokenizer: Any) -> str:
    """A short, stable name of ``tokenizer``'s vocabulary (its size and a hash of its token ->
    id map), which a sidecar of token-aligned rows records so that a run reading its captions
    with another vocabulary is refused. Raises TypeError (unknown kind)."""
    vocab = vocabulary(tokenizer)
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{len(vocab)} tokens, sha256 {digest}"
