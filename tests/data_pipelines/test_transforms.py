"""The fast transforms against torchvision's / open_clip's own preprocessing, on tiny images."""

from __future__ import annotations

import io
import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data_pipelines.decode import decode_image
from data_pipelines.transforms import (
    TrainTransform,
    ValTransform,
    fast_transforms,
    fast_transforms_for_model,
    normalize_images,
)

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
PIXEL_TOLERANCE = 2
"""Max |difference| (0..255) allowed between torch's antialiased bicubic resize of uint8 pixels and
Pillow's bicubic resize (torchvision on PIL images) for the same box: both are separable
fixed-point convolutions with the same kernel and support, and differ only in rounding."""


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with mild noise: resampling differences show, but are not maximal."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    base = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = base + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def as_float(uint8_chw: torch.Tensor) -> torch.Tensor:
    return uint8_chw.to(torch.float32)


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("size", [(48, 36), (30, 50), (17, 17)])
def test_crop_box_is_torchvisions_for_the_same_seed(scale: tuple, size: tuple) -> None:
    image = photo(*size)
    transform = TrainTransform((16, 16), scale=scale)
    for seed in range(50):
        torch.manual_seed(seed)
        left, top, right, bottom = transform.crop_box(image)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        after_theirs = torch.rand(1)
        assert (left, top, right - left, bottom - top) == (j, i, w, h)
        assert torch.equal(after_ours, after_theirs)  # same number of draws from the RNG


@pytest.mark.parametrize("out", [(24, 24), (24, 16)])
def test_train_pixels_match_torchvision_random_resized_crop(out: tuple) -> None:
    reference = T.Compose(
        [T.RandomResizedCrop(out, interpolation=T.InterpolationMode.BICUBIC), T.PILToTensor()]
    )
    ours = TrainTransform(out, scale=(0.08, 1.0))
    for seed, image in enumerate([photo(64, 48), photo(40, 72, 1), photo(30, 30, 2)]):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        want = reference(image)
        assert got.dtype == torch.uint8 and got.shape == (3, *out)
        assert (as_float(got) - as_float(want)).abs().max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_train_converts_other_modes_to_rgb(mode: str) -> None:
    out = TrainTransform((8, 12))(photo(20, 16).convert(mode))
    assert out.shape == (3, 8, 12) and out.dtype == torch.uint8


def test_normalize_images_equals_to_tensor_then_normalize() -> None:
    images = [photo(12, 10, seed) for seed in range(3)]
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    want = torch.stack([reference(image) for image in images])
    batch = torch.stack([T.PILToTensor()(image) for image in images])
    got = normalize_images(batch, MEAN, STD)
    assert got.dtype == torch.float32 and got.device == batch.device
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize_images(batch[0], MEAN, STD), want[0], rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(batch.float(), MEAN, STD)


VAL_CASES = [
    (24, "shortest", "bicubic"),
    ((24, 16), "shortest", "bicubic"),
    (24, "squash", "bicubic"),
    (24, "shortest", "bilinear"),
]


@pytest.mark.parametrize("size, resize_mode, interpolation", VAL_CASES)
def test_val_matches_open_clip_eval_preprocessing(
    size: int | tuple, resize_mode: str, interpolation: str
) -> None:
    """Within one level of 255 after normalisation (Pillow rounds one resampling of the crop's
    box, open_clip one of the whole image and then crops)."""
    theirs = open_clip.image_transform(
        size, is_train=False, resize_mode=resize_mode, interpolation=interpolation
    )
    cfg = {"size": size, "resize_mode": resize_mode, "interpolation": interpolation}
    fast = fast_transforms(cfg)
    for image in [photo(64, 48), photo(40, 72, 1), photo(24, 24, 2), photo(30, 24, 3)]:
        want = theirs(image)
        got = fast.normalize(fast.val(image))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1.01 / 255 / min(STD))


def test_fast_transforms_reads_open_clip_preprocess_cfg() -> None:
    class Visual(torch.nn.Module):
        preprocess_cfg = {"size": (32, 24), "mean": (0.5, 0.5, 0.5), "std": 0.25}

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = Visual()

    fast = fast_transforms_for_model(Model(), aug_cfg={"scale": (0.5, 1.0)})
    assert fast.train == TrainTransform((32, 24), scale=(0.5, 1.0))
    assert fast.val == ValTransform((32, 24), "shortest", "bicubic")
    assert fast.mean == (0.5, 0.5, 0.5) and fast.std == (0.25, 0.25, 0.25)
    assert fast_transforms({"size": 224, "interpolation": "random"}).val.interpolation == "bicubic"
    assert pickle.loads(pickle.dumps(fast)) == fast  # DataLoader workers may be spawned


@pytest.mark.parametrize(
    "cfg, aug_cfg, match",
    [
        ({"resize_mode": "longest"}, None, "resize_mode 'longest' is not supported"),
        ({"crop_pct": 0.9}, None, "unknown keys \\['crop_pct'\\]"),
        ({"mode": "L"}, None, "mode 'L'"),
        ({}, {"color_jitter": 0.4}, "\\['color_jitter'\\] are not supported"),
        ({}, {"use_timm": True}, "\\['use_timm'\\] are not supported"),
        ({}, {"ratio": (0.5, 2.0)}, "\\['ratio'\\] are not supported"),
        ({}, {"colour": 1}, "unknown keys"),
    ],
)
def test_fast_transforms_refuses_what_it_does_not_reproduce(
    cfg: dict, aug_cfg: dict | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fast_transforms(cfg, aug_cfg=aug_cfg)


def test_draft_size_never_makes_a_crop_smaller_than_the_output() -> None:
    assert TrainTransform((224, 224)).draft_size == 273
    assert TrainTransform((224, 224), scale=(0.08, 1.0)).draft_size == 915
    transform = TrainTransform((24, 24), scale=(0.5, 1.0))
    short = transform.draft_size
    for width, height in [(short, short), (2 * short, short), (short, 3 * short)]:
        image = Image.new("RGB", (width, height))
        torch.manual_seed(0)
        for _ in range(300):
            left, top, right, bottom = transform.crop_box(image)
            assert min(right - left, bottom - top) >= 24


def test_draft_size_decodes_a_large_jpeg_at_reduced_scale() -> None:
    transform = TrainTransform((24, 24))  # draft_size 30
    buffer = io.BytesIO()
    photo(128, 96).save(buffer, format="JPEG", quality=90)
    image = decode_image(buffer.getvalue(), draft_size=transform.draft_size)
    assert image.size == (64, 48)  # a quarter would be 32x24, below 30 on one side
    assert transform(image).shape == (3, 24, 24)
