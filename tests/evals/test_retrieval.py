"""Tests for evals.retrieval: a hand-worked case, chunking parity and a CLIP_benchmark reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from evals.retrieval import encode_retrieval_set, retrieval_metrics


def at_angles(degrees: list[float]) -> Tensor:
    """Unit 2-D vectors at the given angles: the score of two of them is cos(difference)."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def reference_recalls(images: Tensor, texts: Tensor, index: Tensor, ks) -> dict[str, float]:
    """CLIP_benchmark's zeroshot_retrieval on the full score matrix (recall_at_k > 0)."""

    def recall_at_k(scores: Tensor, positive_pairs: Tensor, k: int) -> Tensor:
        top = torch.topk(scores, k, dim=1)[1]
        onehot = F.one_hot(top, num_classes=scores.shape[1])
        true_positive = (onehot * positive_pairs[:, None, :]).sum(dim=(1, 2))
        return true_positive / positive_pairs.sum(dim=1)

    scores = texts @ images.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), index] = True
    metrics = {}
    for k in ks:
        image_recall = recall_at_k(scores, positive_pairs, k) > 0
        text_recall = recall_at_k(scores.T, positive_pairs.T, k) > 0
        metrics[f"image_retrieval_recall@{k}"] = image_recall.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_recall.float().mean().item()
    return metrics


def test_hand_worked_case() -> None:
    # images at 0, 90, 45 degrees; captions t0, t1 -> image 0, t2 -> 1, t3, t4 -> 2
    images = at_angles([0, 90, 45])
    texts = at_angles([10, 40, 75, 20, 110])
    index = [0, 0, 1, 2, 2]
    # text queries, images by score: t0: 0,2,1  t1: 2,0,1  t2: 1,2,0  t3: 0,2,1  t4: 1,2,0
    # -> rank of the own image: 1, 2, 1, 2, 2
    # image queries, captions by score: i0: t0,t3,t1,..  i1: t2,t4,..  i2: t1,t3,t2,t0,t4
    # -> rank of the best own caption: 1 (t0), 1 (t2), 2 (t3)
    metrics = retrieval_metrics(images, texts, index, recall_k=(1, 2, 10))
    assert list(metrics) == [
        "image_retrieval_recall@1",
        "text_retrieval_recall@1",
        "image_retrieval_recall@2",
        "text_retrieval_recall@2",
        "image_retrieval_recall@10",
        "text_retrieval_recall@10",
        "image_retrieval_mean_rank",
        "image_retrieval_median_rank",
        "text_retrieval_mean_rank",
        "text_retrieval_median_rank",
    ]
    assert all(type(value) is float for value in metrics.values())
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(1.0)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert metrics["image_retrieval_recall@10"] == 1.0  # k clamped to the 3 images
    assert metrics["text_retrieval_recall@10"] == 1.0
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(8 / 5)
    assert metrics["image_retrieval_median_rank"] == 2.0
    assert metrics["text_retrieval_mean_rank"] == pytest.approx(4 / 3)
    assert metrics["text_retrieval_median_rank"] == 1.0
    assert reference_recalls(images, texts, torch.tensor(index), (1, 2)) == pytest.approx(
        {k: v for k, v in metrics.items() if k.endswith(("@1", "@2"))}
    )


def random_set(n_images: int, seed: int, ties: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Random normalised features with 1-4 captions per image.

    ``ties``: un-normalised sign vectors instead, whose integer scores are exact whatever the
    matmul's summation order, so exact ties (and topk's choice among them) do not depend on the
    chunk shape. (Near-ties of float scores can flip with the chunking, as they can in
    CLIP_benchmark with the device.)
    """
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (n_images,), generator=generator)
    index = torch.repeat_interleave(torch.arange(n_images), counts)
    images = torch.randn(n_images, 6, generator=generator)
    texts = images[index] + 0.8 * torch.randn(len(index), 6, generator=generator)
    if ties:
        return images.sign(), texts.sign(), index
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1), index


@pytest.mark.parametrize("ties", [False, True])
def test_matches_clip_benchmark_reference(ties) -> None:
    images, texts, index = random_set(20, seed=3, ties=ties)
    ks = (1, 2, 5, 10)
    metrics = retrieval_metrics(images, texts, index, recall_k=ks, chunk_size=7)
    expected = reference_recalls(images, texts, index, ks)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 16, 10_000])
def test_chunked_equals_unchunked(chunk_size, ties) -> None:
    images, texts, index = random_set(16, seed=1, ties=ties)
    whole = retrieval_metrics(images, texts, index, recall_k=(1, 3, 5), chunk_size=10_000)
    chunked = retrieval_metrics(images, texts, index, recall_k=(1, 3, 5), chunk_size=chunk_size)
    assert chunked == whole


def test_ranks_agree_with_recall_without_ties() -> None:
    images, texts, index = random_set(30, seed=5)
    metrics = retrieval_metrics(images, texts, index, recall_k=(1,))
    scores = texts @ images.T
    own = scores[torch.arange(len(index)), index]
    ranks = (scores > own[:, None]).sum(1) + 1
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(ranks.double().mean().item())
    assert metrics["image_retrieval_recall@1"] == pytest.approx((ranks == 1).double().mean().item())


def test_image_without_captions_counts_as_a_miss() -> None:
    images = at_angles([0, 90, 180])
    texts = at_angles([5, 95])
    metrics = retrieval_metrics(images, texts, [0, 1], recall_k=(1, 3))
    assert metrics["text_retrieval_recall@3"] == pytest.approx(2 / 3)  # image 2 has no caption
    assert metrics["image_retrieval_recall@1"] == 1.0
    assert metrics["text_retrieval_mean_rank"] == 1.0  # ranks only over images with captions


def test_half_precision_features_are_promoted() -> None:
    images, texts, index = random_set(10, seed=2)
    half = retrieval_metrics(images.half(), texts.half(), index, recall_k=(1, 5))
    assert set(half) == set(retrieval_metrics(images, texts, index, recall_k=(1, 5)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"texts_image_index": [0, 1]}, "one entry per caption"),
        ({"texts_image_index": [0, 5, 1]}, "lie in"),
        ({"recall_k": (0,)}, "positive"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"text_features": torch.zeros(3, 4)}, "dims differ"),
    ],
)
def test_rejects_bad_input(kwargs, match) -> None:
    arguments = {
        "image_features": torch.eye(2),
        "text_features": torch.eye(3, 2),
        "texts_image_index": [0, 1, 1],
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**arguments)


@pytest.mark.parametrize("as_batches", [False, True])
def test_encode_retrieval_set(fake_model, tokenizer, as_batches) -> None:
    images = torch.randn(3, 3, 4, 4)
    captions = [["a cat", "the cat"], ["a dog"], ["a car", "red car", "a fast car"]]
    source = [images[:2], images[2:]] if as_batches else images
    image_features, text_features, index = encode_retrieval_set(
        fake_model, source, captions, tokenizer, batch_size=2
    )
    assert image_features.shape == (3, fake_model.dim)
    assert text_features.shape == (6, fake_model.dim)
    assert index.tolist() == [0, 0, 1, 2, 2, 2]
    torch.testing.assert_close(image_features.norm(dim=1), torch.ones(3))
    expected = F.normalize(fake_model.encode_text(tokenizer(["a dog"])), dim=-1)
    torch.testing.assert_close(text_features[2:3], expected.detach())
    assert all(calls == (False, False) for calls in fake_model.calls[:-1])  # eval, no grad
    assert fake_model.training
    with pytest.raises(ValueError, match="one caption list per image"):
        encode_retrieval_set(fake_model, images, captions[:2], tokenizer)
