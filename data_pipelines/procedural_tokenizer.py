"""The procedural dataset's own SentencePiece tokenizer, packaged as ``vlp:procedural-bpe``.

A captioning head over open_clip's 49,408 BPE tokens dominates the cost of a tiny CoCa on a
CPU (its output layer and softmax); the procedural captions use ~70 word forms. This BPE of
192 pieces, trained on captions of :func:`data_pipelines.synthetic.generate_samples`, keeps
every word of the grammar as one piece (so token weights read as word weights) and ids 0-3 for
PAD, UNK, BOS and EOS (open_clip's CoCa pads with 0). Training is deterministic: the packaged
file is what this module writes, and a test checks it byte for byte.

    python -m data_pipelines.procedural_tokenizer vlp/models/tokenizer_files/procedural-bpe.model
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from data_pipelines.synthetic import generate_samples

VOCAB_SIZE = 192
TRAINING_CAPTIONS = 4000
SEED = 1


def train_procedural_tokenizer() -> bytes:
    """The serialised SentencePiece model (deterministic: one thread, fixed captions)."""
    captions = [sample["txt"] for sample in generate_samples(TRAINING_CAPTIONS, seed=SEED)]
    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=stream, vocab_size=VOCAB_SIZE,
        model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        normalization_rule_name="identity", user_defined_symbols=["(", ")", ","],
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    return stream.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Write the model file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.write_bytes(train_procedural_tokenizer())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
