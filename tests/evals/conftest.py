"""Fixtures for the evals tests: a real open_clip tokenizer, a fake and a tiny real CLIP."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONTEXT_LENGTH = 16


class FakeClip(nn.Module):
    """A CLIP-like model whose embeddings a test can control.

    ``encode_text`` averages a fixed random embedding over the non-padding tokens;
    ``encode_image`` returns the first ``dim`` values of each flattened image, so a test can
    place any embedding inside an image. Each call records whether it ran in training mode and
    with gradients enabled.
    """

    def __init__(self, dim: int = 8, vocab_size: int = 49408, seed: int = 0) -> None:
        super().__init__()
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        self.token_embedding = nn.Embedding(vocab_size, dim)
        with torch.no_grad():
            self.token_embedding.weight.copy_(torch.randn(vocab_size, dim, generator=generator))
        self.calls: list[tuple[bool, bool]] = []

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        mask = (text != 0).float()[..., None]
        features = (self.token_embedding(text) * mask).sum(1) / mask.sum(1)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        features = image.flatten(1)[:, : self.dim] * 3.0
        return F.normalize(features, dim=-1) if normalize else features


@pytest.fixture(scope="session")
def tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's BPE tokenizer (bundled vocabulary, no network) with a short context."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)


@pytest.fixture
def fake_model() -> FakeClip:
    """A fresh FakeClip in training mode (the evals must switch it to eval and back)."""
    return FakeClip().train()


@pytest.fixture
def tiny_clip() -> nn.Module:
    """A randomly initialised, very small open_clip CLIP (16x16 images, 1-layer towers)."""
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
        text_cfg={
            "context_length": CONTEXT_LENGTH,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    )
