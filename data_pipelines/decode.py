"""Decode one sample's members, and the list of errors that count as bad DATA (not bugs).

The stream and the validator share these rules: an image becomes an upright RGB PIL image
(EXIF orientation applied; alpha composited on white; palette, grayscale, CMYK and 16-bit
converted), a caption becomes stripped UTF-8 text. Anything wrong with the bytes raises
:class:`SampleError`, which callers skip and count; any other exception is a bug and propagates.
"""

from __future__ import annotations

import contextlib
import io
import re
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own decompression-bomb limit (about 9459 × 9459)."""

MAX_CAPTION_BYTES = 65_536
"""A caption longer than this (64 KiB; a tokenizer keeps the first 77 tokens) is bad data, not
text: skipped and counted, so a hostile 10 MB member costs no decoding or tokenising."""

IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Member suffixes that hold a sample's image, in the order a reader looks for them."""

_ORIENTATION = 0x0112

DecodedImage = Image.Image | np.ndarray
"""What :func:`decode_for_transforms` gives a transform: a PIL image, or the same pixels as a
uint8 ``[height, width, 3]`` RGB array."""


class SampleError(Exception):
    """A sample (or shard) whose data cannot be used; skipped and counted where it is read."""

    def __init__(self, message: str, url: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.url, self.key = url, key


DATA_ERRORS: tuple[type[BaseException], ...] = (
    SampleError,
    UnidentifiedImageError,  # not an image / zero bytes
    Image.DecompressionBombError,
    SyntaxError,  # Pillow's "broken PNG file" and friends
    UnicodeDecodeError,
    tarfile.TarError,  # tar read errors
    EOFError,  # truncated tar or image
    zlib.error,
    OSError,  # truncated image data, missing shard file, connection reset
)
"""Exception types that mean "this data is bad": skipped and counted, never a crash."""


_IN_MEMORY_FILE = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def describe_data_error(error: BaseException) -> str:
    """One line for a data error, for skip messages: its type (unless it is a
    :class:`SampleError`, whose message says what and where) and its message, without Pillow's
    ``<_io.BytesIO object at 0x…>``, which names nothing; the caller names the file or the
    shard and key."""
    text = _IN_MEMORY_FILE.sub("", str(error)).strip()
    if isinstance(error, SampleError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        wide = np.asarray(image, dtype=np.int64)
        shift = 8 if image.mode.startswith("I;16") or wide.max(initial=0) > 255 else 0
        image = Image.fromarray((wide >> shift).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


@contextlib.contextmanager
def _opened(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """Pillow's image of ``data``, its header read (nothing decoded yet); what goes wrong with
    the data, here or in the caller's block, is a :class:`SampleError`.

    Raises:
        SampleError: empty data, too many pixels (from the header), or a data error.
    """
    if not data:
        raise SampleError("zero-byte image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise SampleError(f"image {width}x{height} is over the pixel limit {max_pixels}")
            yield image
    except SampleError:
        raise
    except DATA_ERRORS as error:
        raise SampleError(f"undecodable image: {describe_data_error(error)}") from error


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Image bytes -> upright RGB image.

    ``draft_size``: let a JPEG decode at a reduced scale whose sides stay >= ``draft_size``
    (libjpeg's DCT scaling: 1/2, 1/4, 1/8; a no-op below 2× the target). Images with more than
    ``max_pixels`` pixels are refused from their header, before any decoding.

    Raises:
        SampleError: empty, undecodable or truncated data, or too many pixels.
    """
    with _opened(data, max_pixels) as image:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        if image.getexif().get(_ORIENTATION, 1) != 1:
            return _to_rgb(ImageOps.exif_transpose(image))
        return _to_rgb(image)


def _draft_scale(width: int, height: int, draft_size: int | None) -> int:
    """The reduction Pillow's JPEG ``draft`` picks for ``draft_size``: the largest of 8, 4, 2, 1
    that divides neither side below it (``JpegImageFile.draft``)."""
    if not draft_size:
        return 1
    fits = min(width // draft_size, height // draft_size)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def decode_for_transforms(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> DecodedImage:
    """Image bytes -> the pixels :func:`decode_image` gives, as a uint8 ``[height, width, 3]``
    array for an upright RGB or grayscale JPEG, as its PIL image otherwise.

    Why: for the training stream's transforms that take arrays (``takes_arrays``). libjpeg-turbo
    through simplejpeg writes straight into a NumPy array; Pillow's decode of the same JPEG costs
    ~1.35x as much, and a crop out of its image two copies (the crop, then an array): crop and
    resize cost 0.70 ms from a PIL image, 0.36 from the array, at 512x384
    (``benchmarks/data_throughput.py --profile``). The pixels are Pillow's, bit for bit, draft scale
    included (the same libjpeg-turbo and its default DCT and upsampling; tested). Pillow still
    reads the header (format, size, EXIF orientation) and decides what a damaged JPEG is: one
    simplejpeg refuses goes to Pillow, which decodes what libjpeg only warns about and refuses a
    truncated file, exactly as :func:`decode_image` does.

    Raises:
        SampleError: as :func:`decode_image`.
    """
    with _opened(data, max_pixels) as image:
        plain = image.format == "JPEG" and image.mode in ("RGB", "L")
        if plain and image.getexif().get(_ORIENTATION, 1) == 1:
            width, height = image.size
            scale = _draft_scale(width, height, draft_size)
            try:
                pixels: np.ndarray = simplejpeg.decode_jpeg(
                    data,
                    colorspace="RGB",
                    min_width=-(-width // scale),
                    min_height=-(-height // scale),
                )
                return pixels
            except ValueError:
                pass  # damaged: Pillow's verdict below
    return decode_image(data, max_pixels=max_pixels, draft_size=draft_size)


def decode_caption(data: bytes, max_bytes: int = MAX_CAPTION_BYTES) -> str:
    """Caption bytes -> stripped text.

    Raises:
        SampleError: over ``max_bytes`` bytes, not UTF-8, or empty after stripping.
    """
    if len(data) > max_bytes:
        raise SampleError(f"caption of {len(data)} bytes is over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise SampleError(f"caption is not UTF-8: {error}") from error
    if not text:
        raise SampleError("empty caption")
    return text
