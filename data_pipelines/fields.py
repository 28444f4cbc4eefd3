"""Which fields the samples of a shard carry, read from its first sample without decoding.

Used at start-up so that a dataset lacking what the objective needs fails in a second with a
message naming the shard and the missing field, not at step 5000 inside webdataset.
"""

from __future__ import annotations

import json

import webdataset as wds

from data_pipelines.decode import DATA_ERRORS, IMAGE_MEMBERS
from data_pipelines.tario import iter_samples

IMAGE_FIELDS = frozenset(IMAGE_MEMBERS)


def first_sample_fields(url: str) -> set[str]:
    """Member extensions of the shard's first sample, plus the keys of its ``json`` member.

    An image member of any supported type also yields the field ``image``.
    """
    try:
        with wds.gopen(url) as stream:
            first = next(iter_samples(stream, url), None)
    except DATA_ERRORS as error:
        raise ValueError(f"shard '{url}' cannot be read as a tar file: {error}") from error
    if first is None:
        raise ValueError(f"shard '{url}' holds no samples")
    fields = set(first.members)
    if "json" in first.members:
        try:
            meta = json.loads(first.members["json"])
        except ValueError as error:
            raise ValueError(f"shard '{url}' sample {first.key}: bad json: {error}") from error
        if isinstance(meta, dict):
            fields.update(meta)
    if fields & IMAGE_FIELDS:
        fields.add("image")
    return fields


def missing_fields(url: str, required: set[str] | frozenset[str]) -> set[str]:
    """The required fields (and ``image``) that the shard's first sample does not carry."""
    return (set(required) | {"image"}) - first_sample_fields(url)
