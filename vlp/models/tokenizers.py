"""A SentencePiece tokenizer with open_clip's tokenizer interface.

open_clip's own SentencePiece-based tokenizers (SigLIP, mT5) come from the HF hub; this one
takes a local ``.model`` file, so users with their own vocabulary (another language, a domain
such as radiology reports) can train one with ``sentencepiece`` and use it offline. The text
tower must pool at the EOS token (``text_cfg.pool_type: "eos"``) with matching ``eos_id`` and
``pad_id``, because SentencePiece's EOS is not the largest token id that CLIP's argmax pooling
assumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch


class SentencePieceTokenizer:
    """Callable ``texts -> LongTensor[B, context_length]``: ids, then EOS, then padding."""

    def __init__(self, model_file: str | Path, context_length: int = 77):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model '{path}' does not exist")
        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.context_length = context_length
        self.vocab_size = int(self.processor.get_piece_size())
        self.eos_id = int(self.processor.eos_id())
        self.pad_id = int(self.processor.pad_id())
        if self.eos_id < 0 or self.pad_id < 0:
            raise ValueError(
                f"SentencePiece model '{path}' needs an EOS and a PAD id (train it with "
                "--eos_id and --pad_id set); it has eos_id={self.eos_id}, pad_id={self.pad_id}"
            )

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Token ids of ``texts``, truncated so that every row ends with EOS."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.processor.encode(list(texts))):
            ids = [*ids[: length - 1], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def check_text_config(self, text_cfg: dict[str, Any]) -> None:
        """Raise if the text tower cannot use this vocabulary (size, pooling, special ids)."""
        problems = []
        if self.vocab_size > int(text_cfg.get("vocab_size", 0)):
            problems.append(f"vocab_size {text_cfg.get('vocab_size')} < {self.vocab_size} pieces")
        if text_cfg.get("pool_type") != "eos":
            problems.append('pool_type must be "eos"')
        if text_cfg.get("eos_id", 2) != self.eos_id or text_cfg.get("pad_id", 0) != self.pad_id:
            problems.append(f"eos_id/pad_id must be {self.eos_id}/{self.pad_id}")
        if problems:
            raise ValueError(
                "text_cfg does not fit the SentencePiece tokenizer: " + "; ".join(problems)
            )
