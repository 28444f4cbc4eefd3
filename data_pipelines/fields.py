"""Which fields the samples of a shard carry, read from its first sample without decoding.

Used at start-up so that a dataset lacking what the objective needs fails in a second with a
message naming the shard and the missing field, not at step 5000 inside webdataset.
"""

from __future__ import annotations

import json
import tarfile

import fsspec

IMAGE_FIELDS = frozenset({"jpg", "jpeg", "png", "webp"})


def first_sample_fields(url: str) -> set[str]:
    """Member extensions of the shard's first sample, plus the keys of its ``json`` member.

    An image member of any supported type also yields the field ``image``.
    """
    fields: set[str] = set()
    key = None
    try:
        with fsspec.open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if key is None:
                    key = base
                elif base != key:
                    break
                fields.add(ext.lower())
                if ext.lower() == "json":
                    payload = tar.extractfile(member)
                    data = json.loads(payload.read()) if payload is not None else {}
                    if isinstance(data, dict):
                        fields.update(data)
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"shard '{url}' cannot be read as a tar file: {error}") from error
    if key is None:
        raise ValueError(f"shard '{url}' holds no samples")
    if fields & IMAGE_FIELDS:
        fields.add("image")
    return fields


def missing_fields(url: str, required: set[str] | frozenset[str]) -> set[str]:
    """The required fields (and ``image``) that the shard's first sample does not carry."""
    return (set(required) | {"image"}) - first_sample_fields(url)
