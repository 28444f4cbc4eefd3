"""Write samples into tar shards in img2dataset's layout (DESIGN §5).

Layout: ``%05d.tar`` shards whose members are ``<key>.jpg|png|webp``, ``<key>.txt``,
``<key>.json`` and (when the sample has a class) ``<key>.cls``; next to them one
``%05d_stats.json`` per shard and a ``sizes.json`` mapping shard basename -> sample count, which
the stream uses to count samples without opening the tars.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import webdataset as wds
from PIL import Image

IMAGE_FORMATS: dict[str, str] = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


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


def _tar_member_dict(sample: dict[str, Any], image_format: str, quality: int) -> dict[str, Any]:
    """Turn one sample into the bytes TarWriter stores, member suffix -> bytes."""
    key = sample.get("key")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be a non-empty string without '.' or '/', got {key!r}")
    if "image" not in sample or "txt" not in sample:
        raise ValueError(f"sample {key}: needs 'image' and 'txt', has {sorted(sample)}")
    image = sample["image"]
    img_bytes = image if isinstance(image, bytes) else encode_image(image, image_format, quality)
    meta = dict(sample.get("json") or {})
    meta["key"] = key
    out: dict[str, Any] = {
        "__key__": key,
        image_format: img_bytes,
        "txt": str(sample["txt"]).encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if sample.get("cls") is not None:
        out["cls"] = str(int(sample["cls"])).encode("ascii")
    return out


def _write_shard(
    samples: Iterator[dict[str, Any]], path: str, n: int, image_format: str, quality: int
) -> int:
    """Write up to ``n`` samples to ``path`` via a temporary name; return how many (0: none)."""
    tmp = f"{path}.tmp"
    count = 0
    try:
        # Fixed mtime: the same samples give byte-identical shards.
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0) as writer:
            for sample in islice(samples, n):
                writer.write(_tar_member_dict(sample, image_format, quality))
                count += 1
    except BaseException:
        os.remove(tmp)
        raise
    if count == 0:
        os.remove(tmp)
    else:
        os.replace(tmp, path)
    return count


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    overwrite: bool = False,
) -> list[str]:
    """Write ``samples`` (dicts with ``key, image, txt`` and optional ``json, cls``) to shards.

    Returns the shard paths in order. Each shard is written under a temporary name and renamed
    once complete, so a crash never leaves a truncated ``.tar`` that looks valid. ``out_dir``
    must be empty or absent unless ``overwrite`` (which removes the old shards and sidecars
    first), because mixing two datasets' shards in one folder silently corrupts ``sizes.json``.
    ``image`` may be a PIL image or already-encoded bytes in ``image_format``.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}"
        )
    out = os.fspath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"write_shards: {out} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    existing = sorted(os.listdir(out))
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"write_shards: output folder {out} is not empty ({len(existing)} entries, e.g. "
                f"{existing[0]!r}); choose an empty folder or pass overwrite=True"
            )
        for name in existing:
            if name.endswith((".tar", "_stats.json", ".tmp")) or name == "sizes.json":
                os.remove(os.path.join(out, name))

    paths: list[str] = []
    sizes: dict[str, int] = {}
    stream = iter(samples)
    while True:
        name = f"{len(paths):05d}.tar"
        count = _write_shard(
            stream, os.path.join(out, name), samples_per_shard, image_format, quality
        )
        if count == 0:
            break
        stats = {"count": count, "successes": count, "failed_to_download": 0}
        _write_json(os.path.join(out, f"{len(paths):05d}_stats.json"), stats)
        sizes[name] = count
        paths.append(os.path.join(out, name))
        if count < samples_per_shard:
            break
    _write_json(os.path.join(out, "sizes.json"), sizes)
    return paths
