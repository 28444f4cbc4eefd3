"""A SentencePiece tokenizer with open_clip's tokenizer interface.

open_clip's own SentencePiece-based tokenizers (SigLIP, mT5) come from the HF hub; this one
takes a local ``.model`` file, so users with their own vocabulary (another language, a domain
such as radiology reports) can train one with ``sentencepiece`` and use it offline. vlp ships
one: ``vlp:procedural-bpe``, a 192-piece BPE of the procedural dataset's captions
(:mod:`data_pipelines.procedural_tokenizer`), which makes a captioning head cheap on a CPU.

A CLIP text tower must pool at the EOS token (``text_cfg.pool_type: "eos"``) with matching
``eos_id`` and ``pad_id``, because SentencePiece's EOS is not the largest token id that CLIP's
argmax pooling assumes. A captioning model (CoCa: a ``multimodal_cfg``) pools its appended CLS
token instead, and needs every caption to start with a start token, as open_clip's tokenizer
writes one: CoCa's caption labels are ``text[:, 1:]`` and generation starts from it. Its
tokenizer therefore writes BOS first, and also decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

TOKENIZER_DIR = Path(__file__).parent / "tokenizer_files"
PACKAGED_TOKENIZERS = {"vlp:procedural-bpe": TOKENIZER_DIR / "procedural-bpe.model"}
"""SentencePiece models shipped with vlp, by the name a config may give (``model.tokenizer``)."""


def resolve_tokenizer_file(name: str | Path) -> Path:
    """The ``.model`` file behind a packaged name (``vlp:procedural-bpe``); paths unchanged."""
    name = str(name)
    if name.startswith("vlp:"):
        if name not in PACKAGED_TOKENIZERS:
            raise FileNotFoundError(
                f"unknown packaged tokenizer '{name}' (known: {', '.join(PACKAGED_TOKENIZERS)})"
            )
        return PACKAGED_TOKENIZERS[name]
    return Path(name)


def run_tokenizer_file(checkpoint: Path) -> Path | None:
    """The SentencePiece file a run trained with (``model.tokenizer`` in the config.yaml of the
    checkpoint's run); None for the model's own tokenizer or a checkpoint outside a run."""
    import yaml

    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    tokenizer = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("tokenizer")
    return resolve_tokenizer_file(tokenizer) if tokenizer else None


class SentencePieceTokenizer:
    """Callable ``texts -> LongTensor[B, context_length]``: [BOS], ids, EOS, then padding.

    ``start_token`` writes BOS first (captioning models); ``sot_token_id``, ``eot_token_id``
    and :meth:`decode` are what caption generation needs.
    """

    def __init__(
        self, model_file: str | Path, context_length: int = 77, *, start_token: bool = False
    ):
        path = resolve_tokenizer_file(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model '{path}' does not exist")
        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.model_file = path
        self.context_length = context_length
        self.vocab_size = int(self.processor.get_piece_size())
        self.eos_id = int(self.processor.eos_id())
        self.pad_id = int(self.processor.pad_id())
        self.bos_id = int(self.processor.bos_id())
        if self.eos_id < 0 or self.pad_id < 0 or (start_token and self.bos_id < 0):
            needs = "a BOS, an EOS and a PAD id" if start_token else "an EOS and a PAD id"
            raise ValueError(
                f"SentencePiece model '{path}' needs {needs} (train it with --bos_id, --eos_id "
                f"and --pad_id set); it has bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}"
            )
        self.start_token = start_token
        self.sot_token_id = self.bos_id if start_token else None
        self.eot_token_id = self.eos_id

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Token ids of ``texts``, truncated so that every row ends with EOS."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        start = [self.bos_id] if self.start_token else []
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(self.processor.encode(list(texts))):
            ids = [*start, *ids][: length - 1] + [self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens (BOS, EOS, PAD) left out."""
        special = {self.bos_id, self.eos_id, self.pad_id}
        return str(self.processor.decode([int(i) for i in ids if int(i) not in special]))

    def get_vocab(self) -> dict[str, int]:
        """Piece → id (Hugging Face's name), to compare vocabularies with another tokenizer."""
        return {self.processor.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def all_special_ids(self) -> list[int]:
        """PAD, UNK, BOS and EOS ids that this model defines (Hugging Face's name)."""
        p = self.processor
        return [i for i in (p.pad_id(), p.unk_id(), p.bos_id(), p.eos_id()) if i >= 0]

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Raise if the model cannot use this vocabulary (size, pooling, special ids)."""
        text_cfg = model_cfg.get("text_cfg", {})
        problems = []
        if self.vocab_size > int(text_cfg.get("vocab_size", 0)):
            problems.append(f"vocab_size {text_cfg.get('vocab_size')} < {self.vocab_size} pieces")
        if text_cfg.get("pad_id", 0) != self.pad_id:
            problems.append(f"pad_id must be {self.pad_id}")
        if not text_cfg.get("embed_cls"):  # a CLS-pooled (CoCa) tower does not pool at EOS
            if text_cfg.get("pool_type") != "eos":
                problems.append('pool_type must be "eos"')
            if text_cfg.get("eos_id", 2) != self.eos_id:
                problems.append(f"eos_id must be {self.eos_id}")
        if "multimodal_cfg" in model_cfg and model_cfg.get("pad_id", 0) != self.pad_id:
            problems.append(f"the captioning model's pad_id must be {self.pad_id}")
        if problems:
            raise ValueError(
                f"model config does not fit the SentencePiece tokenizer '{self.model_file}': "
                + "; ".join(problems)
            )


def sentencepiece_tokenizer(
    model_file: str | Path, model_cfg: dict[str, Any]
) -> SentencePieceTokenizer:
    """The tokenizer of ``model_file`` for a model of config ``model_cfg``, checked against it:
    with a start token for a captioning model (CoCa's ``multimodal_cfg``)."""
    text_cfg = model_cfg.get("text_cfg", {})
    tokenizer = SentencePieceTokenizer(
        model_file,
        text_cfg.get("context_length", 77),
        start_token="multimodal_cfg" in model_cfg,
    )
    tokenizer.check_model_config(model_cfg)
    return tokenizer
