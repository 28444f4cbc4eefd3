"""A SentencePiece tokenizer trained on the demo captions drives a tiny CLIP, offline; the
packaged procedural one drives a tiny CoCa (start token, decoding, generation)."""

import io
import json

import pytest
import sentencepiece as spm
import torch

from data_pipelines.procedural_tokenizer import train_procedural_tokenizer
from data_pipelines.synthetic import generate_samples
from vlp.models import SentencePieceTokenizer, create_model, model_config
from vlp.models.tokenizers import resolve_tokenizer_file


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


def test_packaged_procedural_tokenizer_is_what_its_module_writes():
    packaged = resolve_tokenizer_file("vlp:procedural-bpe")
    assert packaged.read_bytes() == train_procedural_tokenizer()


@pytest.mark.parametrize("seed", [0, 7, 11, 42, 1234])
def test_procedural_captions_round_trip_word_by_word(seed):
    tokenizer = SentencePieceTokenizer("vlp:procedural-bpe", 24, start_token=True)
    captions = [sample["txt"] for sample in generate_samples(300, seed=seed)]
    tokens = tokenizer(captions)
    assert (tokens[:, 0] == tokenizer.bos_id).all() and not (tokens == 1).any()  # 1: UNK
    ends = (tokens == tokenizer.eos_id).int().argmax(dim=1)
    assert (tokens[torch.arange(len(captions)), ends] == tokenizer.eos_id).all()  # never cut
    assert [tokenizer.decode(row.tolist()) for row in tokens] == captions
    words = {word.strip("(),") for caption in captions for word in caption.split()}
    assert all(len(tokenizer.processor.encode(word)) == 1 for word in words)


def test_captioning_model_tokens_start_with_bos_and_generate_text():
    from evals.captioning import generate_captions

    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model(
        "vlp-tiny-coca-procedural", tokenizer="vlp:procedural-bpe"
    )
    assert tokenizer(["a red star"])[0, 0] == tokenizer.sot_token_id == 2
    assert tokenizer.eot_token_id == 3 and tokenizer.vocab_size == 192
    images = torch.stack([preprocess(s["image"]) for s in generate_samples(2, seed=0)])
    captions = generate_captions(model.eval(), images, tokenizer, max_len=6)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)


def test_a_captioning_model_needs_bos_and_a_large_enough_vocabulary(sp_model, tmp_path):
    with pytest.raises(ValueError, match="needs a BOS, an EOS and a PAD id"):
        create_model("vlp-tiny-coca-procedural", tokenizer=str(sp_model))
    config = model_config("vlp-tiny-coca-procedural")
    config["text_cfg"]["vocab_size"] = 100
    path = tmp_path / "small-coca.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_size 100 < 192 pieces"):
        create_model(str(path), tokenizer="vlp:procedural-bpe")


def test_unknown_packaged_tokenizer_is_named():
    with pytest.raises(FileNotFoundError, match="unknown packaged tokenizer 'vlp:nope'"):
        SentencePieceTokenizer("vlp:nope")
