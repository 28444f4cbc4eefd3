"""Fast image transforms for the training stream: open_clip's preprocessing, uint8 out
(docs/architecture.md §3).

open_clip preprocesses every sample in the data workers as RandomResizedCrop(size, scale,
bicubic) -> RGB -> ToTensor -> Normalize, with Pillow's resize, which costs more than the JPEG
decode. Here:

- the crop box is drawn by torchvision's own ``RandomResizedCrop.get_params``, from torch's
  global RNG and nothing else (the stream seeds that RNG per sample, for exact resume);
- the crop is cut by Pillow (no resampling), or is a view of the stream's decoded array
  (``takes_arrays``: ``data_pipelines.decode.decode_for_transforms``), and is resized by
  torch's antialiased bicubic kernel on uint8 pixels in channels-last layout (vectorised:
  2-3.6x faster than Pillow's resize of the same box in ``benchmarks/data_throughput.py``,
  within 2/255 of Pillow's pixels). Pillow's
  one-call ``resize(box=, reducing_gap=)`` was measured too: it saves only the crop copy, and
  ``reducing_gap`` acts only on downscales of at least twice the gap;
- the result stays uint8: no float pass per sample, 4x fewer bytes between processes;
  :func:`normalize_images` makes the whole batch float and normalised on its device
  (``data.uint8_batches``; :class:`NormalizedTransform` normalises in the worker instead).

The val transform (evaluation, where parity with open_clip matters more than speed) keeps
Pillow's resampling, as one resize of the center crop's box. :func:`fast_transforms` builds both
from an open_clip model's preprocess config and refuses what it cannot reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import AugmentationCfg, PreprocessCfg
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from data_pipelines.decode import DecodedImage

__all__ = [
    "FastTransforms",
    "NormalizedTransform",
    "TrainTransform",
    "ValTransform",
    "fast_transforms",
    "fast_transforms_for_model",
    "normalize_images",
]

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _uint8_chw(image: Image.Image) -> torch.Tensor:
    # np.array copies: np.asarray of a PIL image is read-only, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def uint8_chw(image: DecodedImage, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """An RGB image (PIL, or a uint8 ``[H, W, 3]`` array from
    :func:`~data_pipelines.decode.decode_for_transforms`), cut to ``box`` (left, top, right,
    bottom) if given -> uint8 tensor [3, h, w]: a view of an array's pixels (no copy), a copy of
    a PIL image's. Channels-last strides either way."""
    if isinstance(image, np.ndarray):
        if box is not None:
            left, top, right, bottom = box
            image = image[top:bottom, left:right]
        return torch.from_numpy(image).permute(2, 0, 1)
    image = _rgb(image)
    return _uint8_chw(image if box is None else image.crop(box))


def _dimensions(image: DecodedImage) -> Image.Image | torch.Tensor:
    """What torchvision's ``get_params`` reads an image's size from (an array: a tensor view)."""
    return torch.from_numpy(image).permute(2, 0, 1) if isinstance(image, np.ndarray) else image


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio, bicubic) -> RGB -> uint8 tensor [3, H, W].

    The same crops as open_clip's train preprocessing (identical boxes for the same torch RNG
    state), resized with torch's antialiased bicubic kernel instead of Pillow's: pixels within
    2/255 of torchvision's on PIL images. The tensor has channels-last strides (the kernel's
    fast layout); ``torch.stack`` gives a contiguous batch. A non-RGB image is converted
    before the resize (open_clip converts after).
    """

    size: tuple[int, int]
    """Output (height, width)."""
    scale: tuple[float, float] = (0.9, 1.0)
    """Range of the crop's area as a fraction of the image (open_clip's ``AugmentationCfg``)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio, width / height (torchvision's default)."""

    def __post_init__(self) -> None:
        if min(self.size) <= 0:
            raise ValueError(f"TrainTransform: size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(
                f"TrainTransform: need 0 < scale[0] <= scale[1] <= 1, got {self.scale}"
            )
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"TrainTransform: need 0 < ratio[0] <= ratio[1], got {self.ratio}")

    takes_arrays = True
    """Besides PIL images, takes the uint8 ``[H, W, 3]`` arrays of
    :func:`~data_pipelines.decode.decode_for_transforms` (the stream's fast JPEG path), with the
    same boxes and pixels."""

    def crop_box(self, image: DecodedImage) -> tuple[int, int, int, int]:
        """Draw a crop box (left, top, right, bottom) from torch's global RNG, as torchvision
        does (``RandomResizedCrop.get_params``)."""
        top, left, height, width = RandomResizedCrop.get_params(
            _dimensions(image), list(self.scale), list(self.ratio)
        )
        return left, top, left + width, top + height

    def __call__(self, image: DecodedImage) -> torch.Tensor:
        """An RGB image (PIL or array) -> uint8 tensor [3, height, width]."""
        crop = uint8_chw(image, self.crop_box(image))
        resized = F.interpolate(crop[None], size=self.size, mode="bicubic", antialias=True)
        return resized[0]

    @property
    def draft_size(self) -> int:
        """The smallest side to decode at (``decode_image(draft_size=)``, the stream's
        ``draft_size``) such that no crop is ever upsampled.

        A crop covers at least ``scale[0]`` of the image's area with aspect ratio at most
        ``r = max(1 / ratio[0], ratio[1])`` away from square, so its shorter side is at least
        ``S * sqrt(scale[0] / r)`` for an image whose shorter side is ``S``. Requiring that to
        reach the larger output side gives ``S >= max(size) / sqrt(scale[0] / r)``: 273 px for
        224 px output at open_clip's scale (0.9, 1) and ratio (3/4, 4/3), 915 px at
        torchvision's default scale (0.08, 1). JPEG draft decoding halves the image only while
        both sides stay at or above it, so 512x384 decodes in full and 1024x768 at 512x384.
        """
        worst_ratio = max(1 / self.ratio[0], self.ratio[1])
        return math.ceil(max(self.size) / math.sqrt(self.scale[0] / worst_ratio))


@dataclass(frozen=True)
class ValTransform:
    """open_clip's eval preprocessing up to ToTensor: resize, center crop, RGB, uint8 [3, H, W].

    ``resize_mode='shortest'``: scale the shorter side to the output (torchvision's ``Resize``
    rounding for a square output, open_clip's ``ResizeKeepRatio`` for a non-square one), then a
    center crop; done as one Pillow resize of the crop's box. ``'squash'``: resize to the output
    ignoring aspect. Equal to open_clip's pixels up to Pillow's rounding.
    """

    size: tuple[int, int]
    """Output (height, width)."""
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"ValTransform: resize_mode must be one of {_RESIZE_MODES}, got "
                f"{self.resize_mode!r}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"ValTransform: interpolation must be one of {sorted(_INTERPOLATIONS)}, got "
                f"{self.interpolation!r}"
            )

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        out_h, out_w = self.size
        if self.resize_mode == "squash":
            return out_w, out_h
        if out_h == out_w:  # torchvision Resize(int): shorter side exact, longer side truncated
            if width <= height:
                return out_w, int(out_w * height / width)
            return int(out_h * width / height), out_h
        ratio = min(height / out_h, width / out_w)  # open_clip ResizeKeepRatio(longest=0)
        return round(width / ratio), round(height / ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> uint8 tensor [3, height, width]."""
        image = _rgb(image)
        width, height = image.size
        new_w, new_h = self._resized_size(width, height)
        out_h, out_w = self.size
        top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
        if (new_w, new_h) == (width, height):  # torchvision skips a resize to the same size
            return _uint8_chw(image.crop((left, top, left + out_w, top + out_h)))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        resample = _INTERPOLATIONS[self.interpolation]
        return _uint8_chw(image.resize((out_w, out_h), resample, box=box))


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> ``(images / 255 - mean) / std`` in ``dtype``, on their device.

    The same arithmetic as torchvision's ``Normalize(mean, std)(ToTensor()(image))``, applied to a
    whole batch once (on the accelerator, after the uint8 batch crossed from the workers).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    shape = (len(mean), 1, 1)
    mean_t = torch.as_tensor(mean, dtype=dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=dtype, device=images.device).view(shape)
    return images.to(dtype).div_(255).sub_(mean_t).div_(std_t)


@dataclass(frozen=True)
class NormalizedTransform:
    """A uint8 per-sample transform followed by :func:`normalize_images`, in the data worker.

    What ``data.uint8_batches=false`` sends: open_clip's float32 ``Normalize(ToTensor(...))``
    sample, 4x the bytes of the uint8 one. The arithmetic is elementwise and the same as on the
    device, so these images equal the uint8 batch normalised there, bit for bit.
    """

    transform: Callable[[DecodedImage], torch.Tensor]
    """The view's transform: image -> uint8 tensor [3, H, W]."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def takes_arrays(self) -> bool:
        """Whether the view's transform takes arrays too (``TrainTransform.takes_arrays``)."""
        return bool(getattr(self.transform, "takes_arrays", False))

    def __call__(self, image: DecodedImage) -> torch.Tensor:
        """An image -> normalised float32 tensor [3, H, W]."""
        return normalize_images(self.transform(image), self.mean, self.std)


@dataclass(frozen=True)
class FastTransforms:
    """The train and val transforms of one model, and the normalisation that follows them."""

    train: TrainTransform
    val: ValTransform
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def draft_size(self) -> int:
        """The decode draft size for the train stream (see ``TrainTransform.draft_size``)."""
        return self.train.draft_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch -> normalised float32 (:func:`normalize_images` with this mean/std)."""
        return normalize_images(images, self.mean, self.std)


def _triple(value: float | Sequence[float], key: str) -> tuple[float, float, float]:
    values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(map(float, value))
    if len(values) != 3:
        raise ValueError(f"preprocess cfg {key!r} must have 3 values (RGB), got {value!r}")
    return values[0], values[1], values[2]


def _supported_scale(aug_cfg: Mapping[str, Any] | None) -> tuple[float, float]:
    defaults = AugmentationCfg()
    aug = dict(aug_cfg or {})
    if unknown := sorted(set(aug) - set(AugmentationCfg.__dataclass_fields__)):
        raise ValueError(f"aug_cfg: unknown keys {unknown}")
    scale = tuple(aug.pop("scale", None) or defaults.scale)
    if used := sorted(k for k, v in aug.items() if v):
        raise ValueError(
            f"aug_cfg {used} are not supported by the fast train transform (only 'scale' is); "
            "use open_clip.image_transform(..., is_train=True, aug_cfg=...) with a float stream"
        )
    return float(scale[0]), float(scale[1])


def fast_transforms(
    preprocess_cfg: Mapping[str, Any],
    *,
    aug_cfg: Mapping[str, Any] | None = None,
) -> FastTransforms:
    """Fast transforms equal to ``open_clip.image_transform_v2(cfg, is_train, aug_cfg)``.

    ``preprocess_cfg``: open_clip's preprocess dict (``size, mode, mean, std, interpolation,
    resize_mode, fill_color``; missing keys take ``PreprocessCfg``'s defaults). Like open_clip,
    training always resamples bicubic (``interpolation`` applies to val) and ``fill_color``
    only matters to ``resize_mode='longest'``.

    Raises:
        ValueError: a key or value the fast path does not reproduce (``resize_mode='longest'``,
            an augmentation other than ``scale``, a mode other than RGB, an unknown key):
            build open_clip's own transform for those instead.
    """
    fields = set(PreprocessCfg.__dataclass_fields__)
    if unknown := sorted(set(preprocess_cfg) - fields):
        raise ValueError(f"preprocess cfg: unknown keys {unknown} (known: {sorted(fields)})")
    cfg = {**{k: getattr(PreprocessCfg(), k) for k in fields}, **preprocess_cfg}
    if cfg["mode"] != "RGB":
        raise ValueError(f"preprocess cfg mode {cfg['mode']!r} is not supported, only 'RGB'")
    if cfg["resize_mode"] not in _RESIZE_MODES:
        raise ValueError(
            f"preprocess cfg resize_mode {cfg['resize_mode']!r} is not supported by the fast "
            f"val transform (supported: {_RESIZE_MODES}); use open_clip.image_transform"
        )
    if cfg["interpolation"] not in ("bicubic", "bilinear", "random"):
        raise ValueError(f"preprocess cfg interpolation {cfg['interpolation']!r} is unknown")
    size = _size_hw(cfg["size"])
    # open_clip: 'random' means bicubic outside timm's training transforms.
    val_interpolation = "bilinear" if cfg["interpolation"] == "bilinear" else "bicubic"
    return FastTransforms(
        train=TrainTransform(size, scale=_supported_scale(aug_cfg)),
        val=ValTransform(size, cfg["resize_mode"], val_interpolation),
        mean=_triple(cfg["mean"], "mean"),
        std=_triple(cfg["std"], "std"),
    )


def fast_transforms_for_model(
    model: torch.nn.Module,
    *,
    aug_cfg: Mapping[str, Any] | None = None,
) -> FastTransforms:
    """:func:`fast_transforms` from an open_clip model's ``get_model_preprocess_cfg``."""
    return fast_transforms(open_clip.get_model_preprocess_cfg(model), aug_cfg=aug_cfg)
