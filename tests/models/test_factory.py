"""Model creation: vlp's tiny configs, open_clip names, config JSON paths, locking, bad names."""

import json
import logging
import time

import open_clip
import pytest
import torch

from vlp.models import PretrainedError, create_model, model_config, preprocess_config


def test_tiny_config_builds_and_returns_feature_dict():
    model, preprocess_train, preprocess_val, tokenizer = create_model("vlp-tiny-vit")
    images = torch.randn(2, 3, 32, 32)
    out = model(image=images, text=tokenizer(["a red star", "a blue ring"]))
    assert out["image_features"].shape == (2, 128)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    assert float(out["logit_scale"].detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    assert preprocess_config(model)["size"] == (32, 32)


def test_model_config_json_path(tmp_path):
    config = model_config("vlp-tiny-vit")
    config["vision_cfg"]["layers"] = 1
    config["text_cfg"]["layers"] = 1
    path = tmp_path / "my-one-layer.json"
    path.write_text(json.dumps(config))
    model, *_ = create_model(str(path))
    assert len(model.visual.transformer.resblocks) == 1


def test_open_clip_builtin_name_and_local_weights_path(tmp_path):
    reference, *_ = create_model("vlp-tiny-vit")
    weights = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), weights)
    model, *_ = create_model("vlp-tiny-vit", pretrained=str(weights))
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert "ViT-B-32" in open_clip.list_models()


def test_local_dir_schema(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_config("vlp-tiny-vit"), "preprocess_cfg": {}})
    )
    model, *_ = create_model(f"local-dir:{tmp_path}")
    assert model.visual.image_size == (32, 32)


def test_lock_towers():
    model, *_ = create_model("vlp-tiny-vit", lock_image=True)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert model.token_embedding.weight.requires_grad


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99")


def test_from_scratch_model_does_not_warn_it_is_random(caplog):
    with caplog.at_level(logging.WARNING):
        create_model("vlp-tiny-vit")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    # scoped to that one call: the root logger keeps no filter of ours
    assert not logging.getLogger().filters
    with caplog.at_level(logging.WARNING):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_pretrained_tag_not_in_cache_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(PretrainedError, match="not in the local Hugging Face cache and HF_HUB_"):
        create_model("ViT-B-32", "laion2b_s34b_b79k")
    assert time.monotonic() - started < 5


def test_bad_pretrained_names_the_tags_or_the_missing_file(tmp_path):
    with pytest.raises(PretrainedError, match="'nope' is neither a weights file nor a pretrained"):
        create_model("ViT-B-32", "nope")
    with pytest.raises(PretrainedError, match="weights file .*missing.pt' does not exist"):
        create_model("vlp-tiny-vit", str(tmp_path / "missing.pt"))
