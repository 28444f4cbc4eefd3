"""The stream's fast JPEG path (``decode_for_transforms``) gives Pillow's pixels, bit for bit,
and Pillow's verdicts on everything else; transforms that take its arrays give the same views."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from data_pipelines.augment import build_preset
from data_pipelines.decode import SampleError, decode_for_transforms, decode_image
from data_pipelines.transforms import NormalizedTransform, TrainTransform


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with noise: compresses like a photo (flat noise does not)."""
    field = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC))
    noisy = base + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("seed", range(8))
def test_jpeg_pixels_are_pillows_at_every_draft_scale(seed: int, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "MAXBLOCK", 2**24)  # progressive saves of large images
    rng = np.random.default_rng(seed)
    for case in range(6):
        width, height = (int(v) for v in rng.integers(8, 1200, 2))
        image = _photo(rng, width, height)
        options: dict[str, object] = {
            "quality": int(rng.integers(30, 100)),
            "progressive": bool(rng.integers(2)),
        }
        if case == 0:
            image = image.convert("L")
        else:
            options["subsampling"] = int(rng.integers(3))  # 4:4:4, 4:2:2, 4:2:0
        data = _jpeg(image, **options)
        draft = None if case % 2 else int(rng.integers(8, 400))
        fast = decode_for_transforms(data, draft_size=draft)
        assert isinstance(fast, np.ndarray), (width, height, options)
        expected = np.array(decode_image(data, draft_size=draft))
        assert fast.dtype == np.uint8 and fast.shape == expected.shape, (width, height, draft)
        assert np.array_equal(fast, expected), (width, height, options, draft)


def test_a_large_jpeg_decodes_at_pillows_draft_scale() -> None:
    data = _jpeg(_photo(np.random.default_rng(0), 1024, 768), quality=90)
    assert decode_for_transforms(data, draft_size=273).shape == (384, 512, 3)
    assert decode_for_transforms(data, draft_size=100).shape == (192, 256, 3)
    assert decode_for_transforms(data).shape == (768, 1024, 3)


def test_what_the_fast_path_does_not_cover_is_pillows_image() -> None:
    rng = np.random.default_rng(1)
    photo = _photo(rng, 64, 48)
    png = io.BytesIO()
    photo.save(png, "PNG")
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo.save(rotated, "JPEG", exif=exif)
    cmyk = _jpeg(photo.convert("CMYK"))
    for data in (png.getvalue(), rotated.getvalue(), cmyk):
        fast = decode_for_transforms(data, draft_size=16)
        assert isinstance(fast, Image.Image)
        assert np.array_equal(np.array(fast), np.array(decode_image(data, draft_size=16)))
    assert decode_for_transforms(rotated.getvalue()).size == (48, 64)  # upright


def test_damaged_jpegs_get_pillows_verdict() -> None:
    data = _jpeg(_photo(np.random.default_rng(2), 128, 96), quality=90)
    # cut, then an end marker: libjpeg only warns (simplejpeg refuses), Pillow decodes it
    warned = data[: len(data) // 2] + b"\xff\xd9"
    assert np.array_equal(np.array(decode_for_transforms(warned)), np.array(decode_image(warned)))
    for bad, message in (
        (data[: len(data) // 2], "truncated"),
        (b"", "zero-byte"),
        (b"not an image", "undecodable"),
    ):
        with pytest.raises(SampleError, match=message):
            decode_for_transforms(bad)
    with pytest.raises(SampleError, match="over the pixel limit"):
        decode_for_transforms(data, max_pixels=128 * 96 - 1)


@pytest.mark.parametrize("seed", range(4))
def test_transforms_give_the_same_view_of_the_array_and_of_the_image(seed: int) -> None:
    data = _jpeg(_photo(np.random.default_rng(seed), 300 + 37 * seed, 260), quality=85)
    pixels, image = decode_for_transforms(data), decode_image(data)
    assert isinstance(pixels, np.ndarray)
    transforms = [
        TrainTransform((32, 48), scale=(0.3, 1.0)),
        build_preset("convirt", 32),
        build_preset("pyramid-local", 32, interpolation="bilinear"),
        build_preset("whole", 32),
        NormalizedTransform(TrainTransform((32, 32)), (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)),
    ]
    for transform in transforms:
        assert transform.takes_arrays
        views = []
        for source in (pixels, image):
            torch.default_generator.manual_seed(seed)
            views.append(transform(source))
        assert torch.equal(views[0], views[1]), transform


def test_a_wrapper_that_does_not_say_so_gets_images() -> None:
    assert not NormalizedTransform(lambda image: image, (0.5,) * 3, (0.5,) * 3).takes_arrays  # type: ignore[arg-type,return-value]
