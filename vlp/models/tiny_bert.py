"""A tiny random BERT written to a folder: a Hugging Face text tower for tests and CPU demos.

open_clip builds a Hugging Face text tower from a folder (``text_cfg.hf_model_name``) and its
tokenizer from a folder (``text_cfg.hf_tokenizer_name``). :func:`write_tiny_bert` writes both
into one folder, offline, in well under a second: a ``BertConfig`` with hidden width 32, random
weights from a seed, no dropout, and a small WordPiece vocabulary (``vocab.txt``) of report
words plus every letter and digit, so that any lower-case ASCII text tokenizes without
``[UNK]``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens, in BERT's order: ``[PAD]`` is id 0, the model's ``pad_token_id``."""

# Words of the procedural dataset's captions and reports (data_pipelines/synthetic.py) and
# common report words; anything else is spelled out in word pieces.
_WORDS = """
a an the one single there is are it its on in at of to with and or no not near towards
image picture view shape object objects seen shown drawn located background dark noisy noise
small medium large size colour color centre center middle top bottom left right corner side
circle square triangle star cross diamond ring heart arrow
red green blue yellow purple orange white grey gray pink cyan black navy teal brown maroon
findings impression other otherwise normal unremarkable stable change acute abnormality
well defined margins edges clear visible present appears consistent quality adequate mild
""".split()


def tiny_bert_vocab() -> list[str]:
    """The vocabulary, in id order: special tokens, words, characters, ``##`` characters."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [*SPECIAL_TOKENS, *dict.fromkeys(_WORDS)]
    pieces += [c for c in chars if c not in pieces]
    pieces += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return pieces


def write_tiny_bert(
    folder: str | Path,
    *,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 2,
    max_positions: int = 64,
    seed: int = 0,
) -> Path:
    """Write a random BERT (``BertModel`` without its pooler) and its tokenizer into ``folder``.

    The folder then loads with ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    and so as an open_clip ``hf_model_name`` / ``hf_tokenizer_name``, offline. The weights are a
    pure function of the arguments; the global torch RNG is left as it was.

    >>> path = write_tiny_bert(tmp_path / "tiny-bert", layers=2)  # doctest: +SKIP
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    if layers < 1 or hidden % heads:
        raise ValueError(
            f"write_tiny_bert: need layers >= 1 and hidden divisible by heads, got "
            f"layers={layers}, hidden={hidden}, heads={heads}"
        )
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    vocab = tiny_bert_vocab()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": max_positions,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    # Loading from vocab.txt works in transformers 4 and 5 alike; saving adds tokenizer.json.
    AutoTokenizer.from_pretrained(path).save_pretrained(path)

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        # No dropout: a random tower this small has nothing to regularise, and dropout draws
        # from the global RNG, whose state differs per rank: a 2-rank step could then not equal
        # one process's step on the same samples (the recipe tests check that it does).
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG
        model = BertModel(config, add_pooling_layer=False)
    # Re-drawn from a generator of our own, in BERT's scheme (normal weights, std
    # initializer_range; LayerNorm 1, biases 0): the files then depend only on the arguments,
    # not on the global RNG or on how a transformers version initialises.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("bias"):
                parameter.zero_()
            elif "LayerNorm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, config.initializer_range, generator=generator)
    # Written directly, not with save_pretrained: transformers 5 writes nothing there on a rank
    # other than 0 of an initialised process group, and the first use of ``vlp:tiny-bert`` in a
    # run falls to whichever rank takes the lock first (rank 1 then published a folder holding
    # only the tokenizer).
    config.architectures = [type(model).__name__]
    config.to_json_file(path / "config.json")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
