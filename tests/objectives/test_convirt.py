"""ConVIRT: the loss against a hand-written float64 reference, CLIP as its λ = ½ special case,
frozen text layers, its fields and settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.references import unit_features
from vlp.config import ConfigError, load_config
from vlp.models import create_model, write_tiny_bert
from vlp.objectives import create_objective, total_loss
from vlp.objectives.convirt import ConvirtObjective


def convirt_reference(v, u, tau, lam):
    """Eqs 2–4 of the paper, written out: cosine similarities over τ, two cross-entropies."""
    logits = v @ u.T / tau
    targets = torch.arange(len(v))
    image_to_text = F.cross_entropy(logits, targets)  # ℓ^{v→u}: each image against all texts
    text_to_image = F.cross_entropy(logits.T, targets)  # ℓ^{u→v}
    return lam * image_to_text + (1 - lam) * text_to_image


@pytest.mark.parametrize("lam, tau, tile", [(0.75, 0.1, 4), (0.3, 0.5, None), (1.0, 0.07, 3)])
def test_loss_matches_the_papers_equations_forward_and_backward(lam, tau, tile):
    z, w = unit_features(10)
    ours_z, ours_w = z.clone().requires_grad_(), w.clone().requires_grad_()
    ref_z, ref_w = z.clone().requires_grad_(), w.clone().requires_grad_()
    objective = ConvirtObjective(lam=lam, temperature=tau)
    objective.tile_size = tile
    loss = objective.batch_loss({"image_features": ours_z, "text_features": ours_w})
    reference = convirt_reference(ref_z, ref_w, tau, lam)
    torch.testing.assert_close(loss["contrastive_loss"], reference, rtol=1e-12, atol=1e-12)
    loss["contrastive_loss"].backward()
    reference.backward()
    torch.testing.assert_close(ours_z.grad, ref_z.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_w.grad, ref_w.grad, rtol=1e-10, atol=1e-12)


def test_half_lambda_with_a_learned_scale_and_identity_linear_heads_is_clip():
    """λ = ½, the model's learned scale, linear heads set to the identity: the same model, the
    same batch, the same loss and parameter gradients as ``clip``."""
    torch.manual_seed(0)
    clip_model, *_ = create_model("vlp-tiny-vit")
    clip_model = clip_model.double()
    convirt = ConvirtObjective(lam=0.5, learn_temperature=True, head="linear", head_dim=128)
    clip_objective = create_objective("clip")
    reference_model = clip_objective.build_model(_copy(clip_model))
    model = _convirt_model_without_freezing(convirt, _copy(clip_model)).double()
    for head in model.heads.values():
        with torch.no_grad():
            head.weight.copy_(torch.eye(128, dtype=torch.float64))
            head.bias.zero_()
    batch = {
        "image": torch.randn(6, 3, 32, 32, dtype=torch.float64),
        "text": torch.randint(1, 400, (6, 32)),
    }
    losses = {}
    for name, objective, net in (
        ("clip", clip_objective, reference_model),
        ("convirt", convirt, model),
    ):
        loss = total_loss(objective(net(objective.model_inputs(batch)), batch))
        loss.backward()
        losses[name] = loss.detach()
    torch.testing.assert_close(losses["convirt"], losses["clip"], rtol=1e-12, atol=1e-12)
    clip_grads = {n: p.grad for n, p in reference_model.clip.named_parameters()}
    for name, param in model.clip.named_parameters():
        torch.testing.assert_close(param.grad, clip_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _convirt_model_without_freezing(objective, clip):
    """vlp-tiny-vit has open_clip's own text tower (nothing to freeze the HF way)."""
    objective.settings.frozen_text_layers = -1
    return objective.build_model(clip)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"), layers=3)


def _bert_clip(bert):
    text_cfg = {
        "hf_model_name": str(bert),
        "hf_tokenizer_name": str(bert),
        "hf_pooler_type": "max_pooler",
        "hf_proj_type": "linear",
        "context_length": 16,
    }
    model, _, _, tokenizer = create_model(
        "convirt-tiny-vit-bert", model_kwargs={"text_cfg": text_cfg}
    )
    return model, tokenizer


def test_frozen_text_layers_get_no_gradient_and_do_not_move(bert):
    from vlp.config import OptimConfig
    from vlp.training.optim import create_optimizer

    clip, tokenizer = _bert_clip(bert)
    objective = ConvirtObjective(frozen_text_layers=2, head_dim=32)
    model = objective.build_model(clip)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".embeddings." in n for n in frozen) and any(".layer.1." in n for n in frozen)
    assert not any(".layer.2." in n for n in frozen)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert "heads.image.1.weight" in trainable and "heads.text.1.weight" in trainable
    optimizer = create_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tokenizer(["a b c"] * 2 + ["d e f g"] * 2)}
    total_loss(objective(model(objective.model_inputs(batch)), batch)).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    moved = [
        n
        for n, p in model.named_parameters()
        if n in trainable and not torch.equal(p, trainable[n])
    ]
    assert any(n.startswith("heads.") for n in moved) and any(".layer.2." in n for n in moved)


def test_fields_ask_for_one_report_sentence_and_the_convirt_preset():
    fields = ConvirtObjective(min_words=3).fields()
    assert dict(fields.views) == {"image": "convirt"}
    ((name, text),) = fields.texts.items()
    assert (name, text.source, text.choose, text.min_words) == (
        "text",
        "json:report",
        "sentence",
        3,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.convirt.lam=1.5", "lam must be in"),
        ("objective.convirt.head=deep", "head must be one of"),
        ("objective.convirt.lamda=0.5", "did you mean 'lam'"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["objective.name=convirt", override])
