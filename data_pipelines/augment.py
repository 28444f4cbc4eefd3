"""Train-time augmentation presets by name: ``build_preset("convirt", 224)`` (issue 9).

Each preset is a per-sample transform ``PIL.Image -> uint8 tensor [3, S, S]``, not normalised:
the stream stacks uint8 batches and :func:`data_pipelines.transforms.normalize_images` makes
them float on the device, once per batch. Every preset is built the same way:

1. a random resized crop on the fast uint8 path of :class:`~data_pipelines.transforms.
   TrainTransform` (torchvision's crop box, Pillow's cut, torch's antialiased resize), straight
   to ``S x S``, so every later op works on the small output and never on the decoded image;
2. the preset's other ops, torchvision ``transforms.v2`` on that uint8 tensor; only the
   Gaussian blur runs its own kernel (:class:`_GaussianBlur`: torchvision's draws and pixels,
   several times faster).

Why torch's RNG only: the stream seeds ``torch.default_generator`` per sample (from the sample's
place in the stream) just before calling the transform, so the same sample gets the same pixels
after a resume. torchvision's crop box and its v2 transforms draw from that generator alone; an
op that used Python's ``random`` or NumPy's would break exact resume (the tests check this).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from data_pipelines.decode import DecodedImage
from data_pipelines.transforms import TrainTransform, uint8_chw

__all__ = ["PRESET_DOCS", "Augmentation", "WholeImage", "build_preset", "list_presets"]

_INTERPOLATIONS = ("bicubic", "bilinear")


def _blur_kernel(size: int, image_size: int) -> int:
    # Reflection padding needs a half-width below the image side (tiny test images).
    return min(size, 2 * image_size - 1)


def _blur_matrix(n: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """[n, n] matrix M: ``M @ x`` is torchvision's 1-D Gaussian blur of x (reflect-padded)."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    # Tails below 1e-12 change no uint8 pixel, but as float32 denormals (sigma < 0.7 at k = 19)
    # they make the matrix products ~10x slower.
    weights[weights < 1e-12] = 0
    source = (torch.arange(n)[:, None] + offsets).abs()  # reflect at 0 ...
    source = torch.where(source > n - 1, 2 * (n - 1) - source, source)  # ... and at n - 1
    return torch.zeros(n, n).scatter_add_(1, source, weights.expand(n, -1))


class _GaussianBlur(v2.GaussianBlur):
    """torchvision's GaussianBlur on uint8 tensors (the same sigma draw from torch's RNG, the same
    kernel less its negligible tails, reflect padding; pixels within 1/255), as two dense matrix
    products, one per axis.

    Why: torchvision convolves with the full 2-D kernel (k^2 multiply-adds per pixel, denormal
    tails included): at 224 px and k = 19, 10 ms per sample on one thread at sigma >= 1 and
    up to ~10x that at sigma near 0.5; this is ~2 ms for any sigma (the ``convirt`` rows of
    ``benchmarks/augment_presets.py``).
    """

    def transform(self, inpt: torch.Tensor, params: dict[str, list[float]]) -> torch.Tensor:
        (kernel_w, kernel_h), (sigma_w, sigma_h) = self.kernel_size, params["sigma"]
        rows = _blur_matrix(inpt.shape[-2], kernel_h, sigma_h)
        cols = _blur_matrix(inpt.shape[-1], kernel_w, sigma_w)
        out = rows @ inpt.float() @ cols.T
        return out.round_().clamp_(0, 255).to(inpt.dtype)


def _convirt_ops(image_size: int) -> list[v2.Transform]:
    return [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomAffine(
            degrees=20,
            translate=(0.1, 0.1),
            scale=(0.95, 1.05),
            interpolation=v2.InterpolationMode.BILINEAR,
        ),
        v2.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4)),
        _GaussianBlur(kernel_size=_blur_kernel(19, image_size), sigma=(0.1, 3.0)),
    ]


def _protoclip_light_ops(image_size: int) -> list[v2.Transform]:
    return [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.2),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([_GaussianBlur(kernel_size=_blur_kernel(21, image_size))], p=0.2),
    ]


@dataclass(frozen=True)
class _Spec:
    scale: tuple[float, float] | None
    """The random resized crop's area range; None: no crop, the whole image resized."""
    ops: Callable[[int], list[v2.Transform]] | None
    doc: str


_PRESETS: dict[str, _Spec] = {
    "openclip": _Spec(
        (0.9, 1.0),
        None,
        "open_clip's default train preprocessing, today's TrainTransform: RandomResizedCrop("
        "scale=(0.9, 1.0), ratio=(3/4, 4/3)) to S x S, bicubic (antialiased, on uint8). Nothing "
        "else.",
    ),
    "convirt": _Spec(
        (0.6, 1.0),
        _convirt_ops,
        "ConVIRT (Zhang et al., Appendix A), in the paper's order: random crop 'with ratio from "
        "[0.6, 1.0]', read as RandomResizedCrop(scale=(0.6, 1.0), ratio=(3/4, 4/3)) to S x S "
        "(area fraction, torchvision's default aspect range); horizontal flip p=0.5; "
        "RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.95, 1.05), bilinear, fill 0); "
        "ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4)); GaussianBlur(sigma in "
        "[0.1, 3.0], kernel 19 = the smallest odd size covering +-3 sigma at sigma=3, which "
        "the paper does not give), always applied. Flip, affine, jitter and blur act on the S x S "
        "crop, so sigma is in output pixels as in the paper's 224 px pipeline. The paper's "
        "'pre-resize to 256 on the long side' is a shard-preparation step, not part of this.",
    ),
    "protoclip-light": _Spec(
        (0.5, 1.0),
        _protoclip_light_ops,
        "ProtoCLIP's 'light' augmentation (official code): RandomResizedCrop(scale=(0.5, 1.0)) "
        "to S x S, bicubic; horizontal flip p=0.5; ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.2; "
        "RandomGrayscale(p=0.2); GaussianBlur(kernel 21, sigma in [0.1, 2.0] = torchvision's "
        "default) with p=0.2.",
    ),
    "pyramid-local": _Spec(
        (0.5, 1.0),
        None,
        "PyramidCLIP's local view (Gao et al. 2022, §3.1): RandomResizedCrop(scale=(0.5, 1.0), "
        "ratio=(3/4, 4/3)) to S x S, bicubic. Its global view is 'openclip' (scale 0.9-1).",
    ),
    "whole": _Spec(
        None,
        None,
        "The whole image resized to S x S (antialiased; the aspect ratio is not kept), "
        "nothing random: normalised box coordinates of the image are those of this view "
        "(PyramidCLIP pools region features from it).",
    ),
}

PRESET_DOCS: dict[str, str] = {name: spec.doc for name, spec in _PRESETS.items()}
"""Each preset's ops and parameters, for ``--help`` texts and the docs."""


@dataclass(frozen=True)
class Augmentation:
    """One built preset: a callable ``PIL.Image -> uint8 tensor [3, S, S]`` (see the module)."""

    name: str
    crop: TrainTransform
    """The random resized crop (its box; it also resizes when ``interpolation='bicubic'``)."""
    interpolation: str = "bicubic"
    ops: v2.Compose | None = None
    """What follows the crop, on the uint8 tensor."""

    takes_arrays = True
    """Takes the stream's uint8 arrays as well as PIL images (``TrainTransform.takes_arrays``)."""

    def __call__(self, image: DecodedImage) -> torch.Tensor:
        """An image -> uint8 tensor [3, S, S], random from torch's global CPU generator."""
        if self.interpolation == "bicubic":
            pixels = self.crop(image)
        else:  # same box, another antialiased kernel
            cut = uint8_chw(image, self.crop.crop_box(image))
            pixels = F.interpolate(
                cut[None], size=self.crop.size, mode=self.interpolation, antialias=True
            )[0]
        return pixels if self.ops is None else self.ops(pixels)

    @property
    def draft_size(self) -> int:
        """The smallest side JPEGs may decode at without upsampling a crop (the stream's
        ``draft_size``; see :attr:`TrainTransform.draft_size`)."""
        return self.crop.draft_size


@dataclass(frozen=True)
class WholeImage:
    """The whole image resized to ``size x size``: a callable ``PIL.Image -> uint8 [3, S, S]``."""

    name: str
    size: int
    interpolation: str = "bicubic"

    takes_arrays = True
    """Takes the stream's uint8 arrays as well as PIL images (``TrainTransform.takes_arrays``)."""

    def __call__(self, image: DecodedImage) -> torch.Tensor:
        """Resize without cropping, so that a box in [0, 1] image coordinates stays put."""
        pixels = uint8_chw(image)[None].float()
        size = (self.size, self.size)
        resized = F.interpolate(pixels, size=size, mode=self.interpolation, antialias=True)
        return resized[0].round_().clamp_(0, 255).to(torch.uint8)

    @property
    def draft_size(self) -> int:
        """JPEGs may decode at any scale whose sides stay >= ``size``."""
        return self.size


def list_presets() -> list[str]:
    """The preset names :func:`build_preset` accepts, sorted."""
    return sorted(_PRESETS)


def build_preset(
    name: str, image_size: int, *, interpolation: str = "bicubic"
) -> Callable[[Image.Image], torch.Tensor]:
    """The train transform of preset ``name`` with ``image_size x image_size`` output.

    ``interpolation`` is the crop's resize kernel (``bicubic`` as open_clip trains, or
    ``bilinear``); ConVIRT's affine always resamples bilinearly (torchvision's tensor affine
    has no bicubic). Returns an :class:`Augmentation` (a :class:`WholeImage` for ``whole``). Ops and parameters: :data:`PRESET_DOCS`.

    Raises:
        ValueError: an unknown preset (naming the closest one), a non-positive size or an
            unknown interpolation.
    """
    if name not in _PRESETS:
        closest = difflib.get_close_matches(name, list_presets(), n=1, cutoff=0.0)
        raise ValueError(
            f"unknown augmentation preset {name!r}: did you mean {closest[0]!r}? "
            f"Valid presets: {', '.join(list_presets())}"
        )
    if image_size <= 0:
        raise ValueError(f"preset {name!r}: image_size must be positive, got {image_size}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"preset {name!r}: interpolation must be one of {_INTERPOLATIONS}, got "
            f"{interpolation!r}"
        )
    spec = _PRESETS[name]
    if spec.scale is None:
        return WholeImage(name, image_size, interpolation)
    return Augmentation(
        name=name,
        crop=TrainTransform((image_size, image_size), scale=spec.scale),
        interpolation=interpolation,
        ops=None if spec.ops is None else v2.Compose(spec.ops(image_size)),
    )
