"""Tests for evals.export_transformers: transformers' CLIPModel and CLIPProcessor load
`vlp export --format transformers` output and compute vlp's embeddings and tokens."""

from __future__ import annotations

import dataclasses
import json
import stat

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

from data_pipelines.synthetic import CLASSNAMES, generate_samples
from evals.export_transformers import (
    EOS_ID,
    UnmappableModelError,
    check_mappable,
    clip_processor,
    clip_tokenizer,
    to_clip_model,
)
from evals.loading import LoadedModel, load_model
from vlp.atomic_files import umask

ATOL = 1e-5
CAPTIONS = [
    "A photo of a DOG!",
    "it's a red circle, isn't it?",
    "  two\tspaces  and\na newline ",
    "Café naïve résumé, 3.14 and 42 shapes; (brackets) [x] {y} #tag @user",
    "emoji 😀 and 東京",
    "a blue star. " * 30,  # longer than any context: truncated, end token kept
]


@pytest.fixture(scope="module")
def hf_export(tiny_run, tmp_path_factory):
    """The tiny run exported by `vlp export RUN OUT --format transformers`."""
    from launch.cli import main

    out = tmp_path_factory.mktemp("exports") / "hf"
    assert main(["export", str(tiny_run[0]), str(out), "--format", "transformers"]) == 0
    return out


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _images() -> list[Image.Image]:
    """Procedural shapes (the demo's images) and two noise images of other sizes."""
    shapes = [sample["image"] for sample in generate_samples(4, seed=3, image_size=48)]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(45, 60, 3), (300, 225, 3)]]
    return shapes + [Image.fromarray(array) for array in noise]


def test_layout(hf_export) -> None:
    assert sorted(p.name for p in hf_export.iterdir()) == [
        "README.md", "config.json", "merges.txt", "model.safetensors", "processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    config = json.loads((hf_export / "config.json").read_text())
    assert config["projection_dim"] == 128
    assert (
        config["vision_config"]["image_size"] == 32 and config["vision_config"]["patch_size"] == 4
    )
    assert config["text_config"]["max_position_embeddings"] == 32
    assert config["text_config"]["eos_token_id"] == EOS_ID
    assert {config["vision_config"]["hidden_act"], config["text_config"]["hidden_act"]} == {"gelu"}
    assert stat.S_IMODE(hf_export.stat().st_mode) == 0o777 & ~umask()
    for path in hf_export.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask(), path.name


def test_model_card_says_how_to_load_it_both_ways(hf_export) -> None:
    """transformers for this folder; open_clip (and CLIP_benchmark) from the other export."""
    card = (hf_export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "as a Hugging Face transformers `CLIPModel` folder" in card
    assert "| steps trained |" in card
    assert f'CLIPModel.from_pretrained("{hf_export}")' in card
    assert f'CLIPProcessor.from_pretrained("{hf_export}", backend="pil")' in card
    assert "export the run again with `vlp export RUN OUT` (open_clip's hub layout" in card
    assert "local-dir:" not in card.split("## How to load")[1].split("With open_clip")[0]


def test_transformers_gives_vlps_embeddings_and_zero_shot_predictions(hf_export, tiny_run) -> None:
    model, preprocess, tokenizer, _ = load_model(tiny_run[0])
    hf_model = CLIPModel.from_pretrained(hf_export).eval()
    processor = CLIPProcessor.from_pretrained(hf_export, backend="pil")
    images = _images()
    prompts = [f"a photo of a {name}." for name in CLASSNAMES]
    inputs = processor(
        text=prompts, images=images, padding="max_length", truncation=True, return_tensors="pt"
    )
    ours_pixels = torch.stack([preprocess(image) for image in images])
    torch.testing.assert_close(inputs["pixel_values"], ours_pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        ours_image = model.encode_image(ours_pixels)
        ours_text = model.encode_text(tokenizer(prompts))
        theirs_image = _features(hf_model.get_image_features(pixel_values=inputs["pixel_values"]))
        theirs_text = _features(
            hf_model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        )
        logits = hf_model(**inputs).logits_per_image
    torch.testing.assert_close(theirs_image, ours_image, rtol=0, atol=ATOL)
    torch.testing.assert_close(theirs_text, ours_text, rtol=0, atol=ATOL)
    ours_logits = model.logit_scale.exp() * (
        torch.nn.functional.normalize(ours_image, dim=-1)
        @ torch.nn.functional.normalize(ours_text, dim=-1).T
    )
    torch.testing.assert_close(logits, ours_logits, rtol=0, atol=1e-4)
    assert torch.equal(logits.argmax(-1), ours_logits.argmax(-1))


@pytest.mark.parametrize(
    "preprocess_cfg",
    [
        {"size": 24, "resize_mode": "squash", "interpolation": "bilinear"},
        {"size": [24, 24], "resize_mode": "shortest", "interpolation": "bicubic"},
    ],
)
def test_processor_follows_the_resize_mode_and_interpolation(tokenizers, preprocess_cfg) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4), **preprocess_cfg}
    ours = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    theirs = clip_processor(tokenizers[0], cfg).image_processor
    for image in _images():
        pixels = theirs(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, ours(image), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_vit_b_32_converts_with_equal_embeddings() -> None:
    """open_clip's ViT-B/32 (random init): the full-size layout, 224 px, 77 tokens."""
    from vlp.models import model_config

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    hf_model = to_clip_model(model, model_config("ViT-B-32"))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(
            _features(hf_model.get_image_features(pixel_values=pixels)),
            model.encode_image(pixels),
            rtol=0,
            atol=ATOL,
        )
        torch.testing.assert_close(
            _features(hf_model.get_text_features(input_ids=ids)),
            model.encode_text(ids),
            rtol=0,
            atol=ATOL,
        )


def test_quick_gelu_and_mlp_ratio_map() -> None:
    cfg = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 3.0},
    }  # fmt: skip
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    hf_model = to_clip_model(model, cfg)
    assert hf_model.config.text_config.hidden_act == "quick_gelu"
    pixels = torch.randn(2, 3, 16, 16)
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=8)(["a cat", "a red dog"])
    with torch.no_grad():
        torch.testing.assert_close(
            _features(hf_model.get_image_features(pixel_values=pixels)), model.encode_image(pixels)
        )
        torch.testing.assert_close(
            _features(hf_model.get_text_features(input_ids=ids)), model.encode_text(ids)
        )


def test_a_coca_model_is_refused_in_one_line(tmp_path, capsys) -> None:
    from launch.cli import main

    out = tmp_path / "hf"
    assert main(["export", "vlp-tiny-coca", str(out), "--format", "transformers"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "vlp: error: 'vlp-tiny-coca' does not map to transformers' CLIPModel: it is a CoCa "
        "model (a captioning decoder); export it with --format open_clip"
    )
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_loaded(tiny_run) -> LoadedModel:
    return load_model(tiny_run[0])


def _with(loaded: LoadedModel, **info_changes) -> LoadedModel:
    return loaded._replace(info=dataclasses.replace(loaded.info, **info_changes))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"init_logit_bias": -10.0}, "it has a SigLIP logit_bias"),
        ({"vision_cfg": {"timm_model_name": "resnet50"}}, "timm's 'resnet50'"),
        ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "its image tower is a ResNet"),
        ({"text_cfg": {"hf_model_name": "vlp:tiny-bert"}}, "Hugging Face's 'vlp:tiny-bert'"),
        ({"text_cfg": {"hf_tokenizer_name": "x"}}, "its own tokenizer, not open_clip's BPE"),
        ({"vision_cfg": {"attentional_pool": True}}, "no equivalent of vision_cfg.attentional_pool=True"),
        ({"text_cfg": {"pool_type": "last"}}, "no equivalent of text_cfg.pool_type='last'"),
        ({"text_cfg": {"norm_kwargs": {"eps": 1e-6}}}, "text_cfg.norm_kwargs={'eps': 1e-06}"),
        ({"custom_text": True}, "no equivalent of custom_text=True"),
        ({"vision_cfg": {"image_size": [32, 48]}}, "its images are not square ([32, 48])"),
    ],
)  # fmt: skip
def test_configs_that_do_not_map_are_refused(tiny_loaded, change, reason) -> None:
    model_cfg = dict(tiny_loaded.info.model_cfg)
    for key, value in change.items():
        model_cfg[key] = {**model_cfg[key], **value} if isinstance(value, dict) else value
    with pytest.raises(UnmappableModelError, match="does not map") as refused:
        check_mappable(_with(tiny_loaded, model_cfg=model_cfg))
    assert reason in str(refused.value)


def test_own_tokenizers_objective_heads_and_max_pooled_text_are_refused(
    tiny_loaded, tmp_path
) -> None:
    from vlp.models.vlp_model import VlpModel

    with pytest.raises(UnmappableModelError, match="its own tokenizer"):
        check_mappable(_with(tiny_loaded, tokenizer_file=tmp_path / "sentencepiece.model"))
    with_heads = VlpModel(tiny_loaded.model, {"image": torch.nn.Linear(128, 8)})
    with pytest.raises(UnmappableModelError, match=r"heads \(heads.safetensors\)"):
        check_mappable(tiny_loaded._replace(model=with_heads))
    max_pooled = VlpModel(tiny_loaded.model, text_pool="max")
    with pytest.raises(UnmappableModelError, match="pooled with text_pool=max"):
        check_mappable(tiny_loaded._replace(model=max_pooled))


@pytest.fixture(scope="module")
def tokenizers() -> tuple[open_clip.tokenizer.SimpleTokenizer, CLIPTokenizer]:
    ours = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    return ours, clip_tokenizer(ours)


def _open_clip_ids(tokenizer, text: str) -> list[int]:
    """open_clip's ids up to and including the end token (it pads with 0 after it)."""
    ids = tokenizer([text])[0].tolist()
    return ids[: ids.index(EOS_ID) + 1]


@pytest.mark.parametrize("text", CAPTIONS)
def test_tokenizer_gives_open_clips_ids(tokenizers, text) -> None:
    ours, theirs = tokenizers
    ids = theirs(text, truncation=True)["input_ids"]
    assert ids == _open_clip_ids(ours, text)
    assert len(ids) <= 77


def test_tokenizer_files_load_on_their_own(hf_export, tmp_path) -> None:
    """vocab.json + merges.txt alone (what older tokenizers read) give the same ids."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_export / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(tmp_path)
    exported = CLIPTokenizer.from_pretrained(hf_export)
    assert from_files.model_max_length == exported.model_max_length == 32  # the run's context
    for text in CAPTIONS:
        ids = exported(text, truncation=True)["input_ids"]
        assert from_files(text, truncation=True)["input_ids"] == ids


def test_tokenizer_differs_only_by_open_clips_ftfy_and_html_cleaning(tokenizers) -> None:
    """open_clip repairs text with ftfy and unescapes HTML before tokenizing; transformers does
    not (the module docstring documents it)."""
    ours, theirs = tokenizers
    text = "it’s a &amp; b"
    assert theirs(text)["input_ids"] != _open_clip_ids(ours, text)
    cleaned = open_clip.tokenizer.basic_clean(text)
    assert theirs(cleaned)["input_ids"] == _open_clip_ids(ours, text)
