"""freeze_text_layers: the embeddings and the first N layers of an HF text tower get no gradient
and do not move under an optimizer step; the rest trains; bad N and unknown towers are refused."""

from __future__ import annotations

import pytest
import torch

from vlp.models import create_model, freeze_text_layers, write_tiny_bert

LAYERS = 4


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"), layers=LAYERS)


def _model(bert_folder):
    text_cfg = {
        "hf_model_name": str(bert_folder),
        "hf_tokenizer_name": str(bert_folder),
        "hf_pooler_type": "max_pooler",
        "hf_proj_type": "mlp",
        "context_length": 16,
    }
    return create_model("convirt-tiny-vit-bert", model_kwargs={"text_cfg": text_cfg})


@pytest.mark.parametrize("n_layers", range(LAYERS + 1))
def test_frozen_names_are_embeddings_and_the_first_n_layers(bert_folder, n_layers):
    model, *_ = _model(bert_folder)
    frozen = freeze_text_layers(model, n_layers)
    names = dict(model.named_parameters())
    assert set(frozen) == {n for n, p in names.items() if not p.requires_grad}
    bert = "text.transformer."
    expected_modules = ["embeddings.", *(f"encoder.layer.{i}." for i in range(n_layers))]
    assert {n for n in names if n.startswith(tuple(bert + m for m in expected_modules))} == set(
        frozen
    )
    assert all(
        names[n].requires_grad for n in names if n.startswith(f"{bert}encoder.layer.{n_layers}.")
    )


def test_frozen_params_get_no_grad_and_do_not_move_the_rest_trains(bert_folder):
    model, _, _, tokenizer = _model(bert_folder)
    frozen = set(freeze_text_layers(model, 2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenizer(["a red circle", "blue star at the top", "green ring", "stable"])
    out = model(image=images, text=tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    loss.backward()
    optimizer.step()
    text_names = [n for n, _ in model.named_parameters() if n.startswith("text.")]
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert parameter.grad is None, name
            assert torch.equal(parameter, before[name]), name
        elif name.startswith("text.") and parameter.grad.abs().sum() > 0:
            assert not torch.equal(parameter, before[name]), name
    moved = {n.split(".")[4] for n in text_names if "encoder.layer." in n and n not in frozen}
    assert moved == {"2", "3"}
    for layer in ("2", "3"):  # every unfrozen layer really moved
        prefix = f"text.transformer.encoder.layer.{layer}."
        assert any(
            not torch.equal(p, before[n])
            for n, p in model.named_parameters()
            if n.startswith(prefix)
        )
    assert not torch.equal(model.text.proj[0].weight, before["text.proj.0.weight"])


def test_accepts_the_tower_or_the_transformers_model(bert_folder):
    model, *_ = _model(bert_folder)
    names = freeze_text_layers(model.text, 1)
    assert "transformer.embeddings.word_embeddings.weight" in names
    names = freeze_text_layers(model.text.transformer, 1)
    assert "encoder.layer.0.attention.self.query.weight" in names


@pytest.mark.parametrize("n_layers", [LAYERS + 1, 12, -1])
def test_more_layers_than_the_tower_has_is_refused(bert_folder, n_layers):
    model, *_ = _model(bert_folder)
    with pytest.raises(ValueError, match=f"n_layers={n_layers}, but .* has {LAYERS} layers"):
        freeze_text_layers(model, n_layers)
    assert all(p.requires_grad for p in model.parameters()), "nothing frozen on refusal"


def test_unknown_tower_layout_and_no_hf_tower_are_refused():
    from transformers import DistilBertConfig, DistilBertModel

    distilbert = DistilBertModel(
        DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    )
    with pytest.raises(ValueError, match="DistilBertModel \\(model_type 'distilbert'\\)"):
        freeze_text_layers(distilbert, 1)
    clip, *_ = create_model("vlp-tiny-vit")
    with pytest.raises(ValueError, match="has no Hugging Face text tower"):
        freeze_text_layers(clip, 1)
