"""A SentencePiece tokenizer trained on the demo captions drives a tiny CLIP, offline."""

import io
import json

import pytest
import sentencepiece as spm
import torch

from data_pipelines.synthetic import generate_samples
from vlp.models import SentencePieceTokenizer, create_model, model_config


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    captions = [sample["txt"] for sample in generate_samples(400, seed=3)]
    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=stream, vocab_size=64,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2, model_type="unigram",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sp") / "captions.model"
    path.write_bytes(stream.getvalue())
    return path


def test_tokens_end_with_eos_and_pad(sp_model):
    tokenizer = SentencePieceTokenizer(sp_model, context_length=12)
    tokens = tokenizer(["a small red star near the top left", "x " * 50])
    assert tokens.shape == (2, 12)
    length = int((tokens[0] != 0).sum())
    assert tokens[0, length - 1] == 2 and (tokens[0, length:] == 0).all()
    assert tokens[1, -1] == 2  # truncated rows still end with EOS


def test_create_model_with_sentencepiece(sp_model, tmp_path):
    config = model_config("vlp-tiny-vit")
    config["text_cfg"].update(vocab_size=64, pool_type="eos", eos_id=2, pad_id=0)
    path = tmp_path / "tiny-sp.json"
    path.write_text(json.dumps(config))
    model, _, _, tokenizer = create_model(str(path), tokenizer=str(sp_model))
    out = model(image=torch.randn(2, 3, 32, 32), text=tokenizer(["a red star", "a blue ring"]))
    assert out["text_features"].shape == (2, 128)


def test_text_config_mismatch_is_named(sp_model):
    with pytest.raises(ValueError, match='pool_type must be "eos"'):
        create_model("vlp-tiny-vit", tokenizer=str(sp_model))
