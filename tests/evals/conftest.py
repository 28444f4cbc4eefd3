"""Fixtures for the evals tests: a real open_clip tokenizer, a fake and a tiny real CLIP, and a
run directory with vlp-tiny-vit checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

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


def save_run_checkpoint(run_dir: Path, step: int, model: nn.Module, model_name: str) -> Path:
    """Save ``model`` in vlp's run layout, as the trainer would (``checkpoints/step_N``)."""
    from safetensors.torch import save_file

    from vlp.models import model_config, preprocess_config

    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    checkpoint.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(checkpoint / "model.safetensors"))
    info = {
        "model_name": model_name,
        "model_cfg": model_config(model_name),
        "preprocess_cfg": preprocess_config(model),
    }
    (checkpoint / "model_config.json").write_text(json.dumps(info))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step}))
    (checkpoint / "COMPLETE").write_text("")  # what the trainer writes last (a finished save)
    return checkpoint


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A run directory holding randomly initialised vlp-tiny-vit weights at steps 5 and 10.

    Returns the run directory and the model saved at step 10 (the newest checkpoint).
    """
    from vlp.models import create_model

    run_dir = tmp_path_factory.mktemp("run")
    for step, seed in ((5, 1), (10, 2)):
        torch.manual_seed(seed)
        model = create_model("vlp-tiny-vit")[0].eval()
        save_run_checkpoint(run_dir, step, model, "vlp-tiny-vit")
    return run_dir, model


def write_image_folder(
    root: Path, per_class: int = 3, classes: int = 3, seed: int = 0
) -> list[str]:
    """Synthetic shapes as ``root/<shape> shape/<key>.png`` for the first ``classes`` shapes.

    Class names contain a space (as real folder names may). Returns them, sorted.
    """
    from data_pipelines.synthetic import CLASSNAMES, generate_samples

    counts = dict.fromkeys(range(classes), 0)
    for sample in generate_samples(40 * per_class * classes, seed=seed):
        cls = sample["cls"]
        if cls < classes and counts[cls] < per_class:
            folder = root / f"{CLASSNAMES[cls]} shape"
            folder.mkdir(parents=True, exist_ok=True)
            sample["image"].save(folder / f"{sample['key']}.png")
            counts[cls] += 1
        if all(count == per_class for count in counts.values()):
            break
    return sorted(f"{CLASSNAMES[c]} shape" for c in range(classes))
