"""Turn one sample dict into the tar members it is stored as (the per-sample work of a writer).

This is the part of writing shards that costs CPU and I/O: read the image (a path or fsspec URL,
encoded bytes, or a PIL image), check it with the training stream's decoding rules
(:func:`data_pipelines.decode.decode_image`), shrink it to a maximum side and encode it. It is a
pure function of the sample, so :mod:`data_pipelines.write` can run it in worker processes and
still write byte-identical shards; it lives apart from the writer so that those workers import
neither webdataset nor torch.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from PIL import Image, ImageOps

from data_pipelines.decode import DATA_ERRORS, IMAGE_MEMBERS, decode_image, describe_data_error

IMAGE_FORMATS: dict[str, str] = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
RESERVED = frozenset({"key", "image", "txt", "json", "cls"})
"""Sample dict keys with a fixed meaning; every other key is an extra member's suffix."""


@dataclass(frozen=True)
class Skipped:
    """A sample left out of the shards, where it came from and why.

    ``where`` names the source row or the image path/URL (else the sample key); ``stage`` says
    whether the caption, the image read or the image decode failed (img2dataset's
    ``failed_to_download`` counts ``read``, ``failed_to_resize`` counts ``decode``).
    """

    where: str
    reason: str
    stage: Literal["caption", "read", "decode"]


def encode_image(image: Image.Image, image_format: str = "jpg", quality: int = 95) -> bytes:
    """Encode a PIL image to bytes in ``image_format`` (jpg, png or webp)."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}"
        )
    fmt = IMAGE_FORMATS[image_format]
    opts: dict[str, Any] = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **opts)
    return buf.getvalue()


def _shrink(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(image.size) <= max_side:
        return image
    return ImageOps.contain(image, (max_side, max_side), Image.Resampling.LANCZOS)


def _image_bytes(
    image: Any, image_format: str, quality: int, max_side: int | None, where: str
) -> bytes | Skipped:
    """The stored image bytes, or why the image was skipped.

    Bytes are stored as given unless ``max_side`` asks to shrink them: the caller vouches that
    they are in ``image_format`` (tests write deliberately broken images this way). A file is
    decoded with the training rules, so a shard never holds an image the stream would skip, and
    kept byte for byte when it already is in ``image_format`` and small enough; otherwise the
    upright RGB image is re-encoded.
    """
    if isinstance(image, Image.Image):
        return encode_image(_shrink(image, max_side), image_format, quality)
    if isinstance(image, bytes) and max_side is None:
        return image
    if isinstance(image, str):
        try:
            with fsspec.open(image, "rb") as f:
                data = f.read()
        except DATA_ERRORS as error:
            return Skipped(where, f"cannot read image: {describe_data_error(error)}", "read")
    elif isinstance(image, bytes):
        data = image
    else:
        raise TypeError(f"{where}: image must be a PIL image, bytes or a path/URL, got {image!r}")
    try:
        decoded = decode_image(data, draft_size=max_side)
        with Image.open(io.BytesIO(data)) as header:
            same_format = header.format == IMAGE_FORMATS[image_format]
    except DATA_ERRORS as error:
        return Skipped(where, str(error), "decode")
    if same_format and (max_side is None or max(decoded.size) <= max_side):
        return data
    return encode_image(_shrink(decoded, max_side), image_format, quality)


def _extra_member(key: str, suffix: str, value: Any) -> bytes:
    if "/" in suffix or suffix.startswith((".", "_")) or suffix in IMAGE_MEMBERS:
        raise ValueError(f"sample {key}: {suffix!r} cannot be a member suffix")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if suffix.endswith("json"):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise ValueError(f"sample {key}: member {suffix!r} needs bytes or text, got {value!r}")


def prepare_sample(
    sample: dict[str, Any],
    *,
    image_format: str = "jpg",
    quality: int = 95,
    max_side: int | None = None,
) -> dict[str, Any] | Skipped:
    """The TarWriter dict (member suffix -> bytes, plus ``__key__``) of one sample, or a skip.

    ``sample`` has ``key, image, txt`` and optional ``json`` (metadata; ``key`` is added),
    ``cls`` (an int) and extra members named by their suffix (``"summary.txt": str``,
    ``"objects.json": list``, ``"seg.png": bytes``). ``image`` is a PIL image, bytes in
    ``image_format`` (stored as given) or a local path / fsspec URL; an image file that cannot
    be read or decoded, or bytes that cannot be decoded for ``max_side``, give
    :class:`Skipped`.
    Malformed samples (bad key, missing field) raise ``ValueError``: they are bugs, not data.
    """
    key = sample.get("key")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be a non-empty string without '.' or '/', got {key!r}")
    if "image" not in sample or "txt" not in sample:
        raise ValueError(f"sample {key}: needs 'image' and 'txt', has {sorted(sample)}")
    image = sample["image"]
    where = image if isinstance(image, str) else f"sample {key}"
    image_bytes = _image_bytes(image, image_format, quality, max_side, where)
    if isinstance(image_bytes, Skipped):
        return image_bytes
    meta = dict(sample.get("json") or {})
    meta["key"] = key
    out: dict[str, Any] = {
        "__key__": key,
        image_format: image_bytes,
        "txt": str(sample["txt"]).encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if sample.get("cls") is not None:
        out["cls"] = str(int(sample["cls"])).encode("ascii")
    for suffix in sorted(set(sample) - RESERVED):
        out[suffix] = _extra_member(key, suffix, sample[suffix])
    return out
