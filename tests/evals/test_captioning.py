"""Tests for evals.captioning and `vlp eval captioning`: decoding from a tiny CoCa (untrained,
and fitted to two captions so that the right answer is known), BLEU-4/CIDEr on hand-worked
cases, and the command end to end on vlp shards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards
from evals.captioning import CaptioningError, captioning_scores, generate_captions
from evals.results import read_result, result_filename
from tests.evals.conftest import save_run_checkpoint, write_image_folder
from tests.evals.test_plots import assert_png
from tests.launch.test_evaluate import cli, common
from vlp.models import create_model
from vlp.models.vlp_model import VlpModel


@pytest.fixture(scope="module")
def untrained():
    """A randomly initialised vlp-tiny-coca: (model, preprocess_val, tokenizer)."""
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("vlp-tiny-coca")
    return model, preprocess, tokenizer


@pytest.fixture(scope="module")
def fitted():
    """vlp-tiny-coca fitted (Adam, caption loss only) to two synthetic images and their
    captions, so that decoding must give those captions back: (model, preprocess, tokenizer,
    samples)."""
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("vlp-tiny-coca")
    samples = list(generate_samples(4, seed=1))[2:]  # "there is a purple diamond", a cross
    images = torch.stack([preprocess(sample["image"]) for sample in samples])
    text = tokenizer([sample["txt"] for sample in samples])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(25):  # caption loss ~0.03
        out = model(images, text)
        loss = F.cross_entropy(out["logits"].transpose(1, 2), out["labels"], ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), preprocess, tokenizer, samples


def images_of(samples, preprocess) -> torch.Tensor:
    return torch.stack([preprocess(sample["image"]) for sample in samples])


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_one_caption_per_image(untrained, method) -> None:
    model, preprocess, tokenizer = untrained
    model.train()
    images = images_of(generate_samples(3, seed=0), preprocess)
    captions = generate_captions(model, images, tokenizer, method=method, max_len=8, num_beams=3)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert model.training  # the model's mode is restored


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_max_len_cuts_the_caption(fitted, method) -> None:
    model, preprocess, tokenizer, samples = fitted
    images = images_of(samples, preprocess)
    captions = generate_captions(model, images, tokenizer, method=method, max_len=4, min_len=2)
    assert captions == ["there is a", "a large cross"]  # 3 tokens after the start token


@pytest.mark.parametrize(("method", "num_beams"), [("greedy", 1), ("beam", 1), ("beam", 4)])
def test_a_fitted_coca_writes_its_captions(fitted, method, num_beams) -> None:
    model, preprocess, tokenizer, samples = fitted
    images = images_of(samples, preprocess)
    expected = [sample["txt"] for sample in samples]
    assert (
        generate_captions(model, images, tokenizer, method=method, num_beams=num_beams) == expected
    )
    assert generate_captions(VlpModel(model), images, tokenizer, method=method) == expected


def test_default_max_len_fits_a_context_shorter_than_30() -> None:
    """open_clip's 30 tokens by default, cut to the model's context (24 here) instead of
    refusing the default."""
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model(
        "vlp-tiny-coca-procedural", tokenizer="vlp:procedural-bpe"
    )
    images = images_of(generate_samples(2, seed=0), preprocess)
    captions = generate_captions(model, images, tokenizer, min_len=2)
    assert len(captions) == 2 and all(len(tokenizer([c])[0].nonzero()) <= 24 for c in captions)


def test_greedy_is_one_beam(untrained) -> None:
    model, preprocess, tokenizer = untrained
    images = images_of(generate_samples(2, seed=3), preprocess)
    assert generate_captions(model, images, tokenizer) == generate_captions(
        model, images, tokenizer, method="beam", num_beams=1
    )


def test_a_clip_model_cannot_caption(tiny_clip, tokenizer) -> None:
    with pytest.raises(ValueError, match="^CLIP cannot caption: captioning needs a CoCa"):
        generate_captions(tiny_clip, torch.zeros(1, 3, 16, 16), tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "nucleus"}, "method must be one of greedy, beam"),
        ({"max_len": 33}, "max_len <= 32"),
        ({"max_len": 5}, "min_len < max_len"),
        ({"method": "beam", "num_beams": 0}, "num_beams must be >= 1"),
    ],
)
def test_impossible_settings(untrained, kwargs, match) -> None:
    model, _, tokenizer = untrained
    with pytest.raises(CaptioningError, match=match):
        generate_captions(model, torch.zeros(1, 3, 32, 32), tokenizer, **kwargs)


def test_identical_captions_score_bleu_one_and_cider_ten() -> None:
    references = {"a": ["there is a purple diamond"], "b": ["a large cross on a dark background"]}
    predictions = {"a": "There is a purple diamond.", "b": "a large cross on a dark background"}
    scores = captioning_scores(references, predictions)
    assert scores["bleu4"] == pytest.approx(1.0)
    # CIDEr-D per image is 10 x the mean over n = 1..4 of the (clipped) cosine of the tf-idf
    # n-gram vectors: 1 for identical captions, as every order has an n-gram of one image only
    assert scores["cider"] == pytest.approx(10.0)
    references["a"].append("a diamond")  # BLEU takes the best reference, CIDEr the mean
    scores = captioning_scores(references, predictions)
    assert scores["bleu4"] == pytest.approx(1.0) and 0.0 < scores["cider"] < 10.0


def test_disjoint_words_score_zero() -> None:
    references = {0: ["a red circle on white"], 1: ["two blue squares side by side"]}
    scores = captioning_scores(references, {0: "green dots everywhere here", 1: "nothing at all"})
    assert scores["bleu4"] < 1e-6 and scores["cider"] == 0.0


@pytest.mark.parametrize(
    ("prediction", "bleu4"),
    [
        # p1..p4 = 6/7, 4/6, 3/5, 2/4 (the clipped n-gram matches); equal lengths: no penalty
        ("a red circle on a black background", (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25),
        # every n-gram matches, but 5 words against 7: brevity penalty exp(1 - 7/5)
        ("a red circle on a", math.exp(1 - 7 / 5)),
    ],
)
def test_bleu4_by_hand(prediction, bleu4) -> None:
    scores = captioning_scores({0: ["a red circle on a white background"]}, {0: prediction})
    assert scores["bleu4"] == pytest.approx(bleu4, rel=1e-6)
    assert scores["cider"] == 0.0  # one image: every n-gram is in all references, idf 0


def test_scores_need_matching_keys_and_references() -> None:
    with pytest.raises(ValueError, match="1 images have no prediction"):
        captioning_scores({0: ["a"], 1: ["b"]}, {0: "a"})
    with pytest.raises(ValueError, match="image 0 has no reference caption"):
        captioning_scores({0: []}, {0: "a"})


@pytest.fixture(scope="module")
def coca_run(fitted, tmp_path_factory):
    """A run directory with the fitted CoCa, and vlp shards (PNG) of its two images."""
    model, _, _, samples = fitted
    root = tmp_path_factory.mktemp("coca")
    save_run_checkpoint(root / "run", 7, model, "vlp-tiny-coca")
    write_shards(samples, root / "shards", image_format="png")
    return root


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_command_writes_json_and_png(coca_run, fitted, tmp_path, capsys, method) -> None:
    argv = [*common(coca_run / "run", coca_run / "shards", tmp_path), "--method", method]
    assert cli(["eval", "captioning", *argv, "--num-beams", "2"]) == 0
    checkpoint = str(coca_run / "run" / "checkpoints" / "step_00000007")
    names = {"dataset": "shards", "model": "vlp-tiny-coca", "pretrained": checkpoint}
    path = tmp_path / result_filename(**names, task="captioning")
    result = read_result(path)
    assert result["task"] == "captioning" and result["model"] == "vlp-tiny-coca"
    assert result["metrics"]["bleu4"] == pytest.approx(1.0)
    assert result["metrics"]["cider"] == pytest.approx(10.0)
    captions = [sample["txt"] for sample in fitted[3]]
    assert sorted(result["predictions"].values()) == sorted(captions)
    assert result["images_evaluated"] == 2 and result["captions"] == 2
    assert result["generation"]["method"] == method
    assert_png(path.with_suffix(".png"))
    assert "bleu4" in capsys.readouterr().out


def test_command_refuses_what_cannot_caption(tiny_run, coca_run, tmp_path, capsys) -> None:
    clip_run, _ = tiny_run
    assert cli(["eval", "captioning", *common(clip_run, coca_run / "shards", tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "cannot caption: captioning needs a CoCa model" in line and str(clip_run) in line
    write_image_folder(tmp_path / "folder", per_class=1, classes=2)
    argv = common(coca_run / "run", tmp_path / "folder", tmp_path)
    assert cli(["eval", "captioning", *argv]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "is a classification dataset; captioning needs captions" in line
