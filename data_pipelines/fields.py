"""Which fields the samples of a shard carry, read from its first sample without decoding.

Used at start-up so that a dataset lacking what the objective needs fails in a second with a
message naming the shard and the missing field, not at step 5000 inside webdataset.
:func:`missing_batch_fields` checks a stream's :class:`~data_pipelines.batch_fields.BatchFields`
(members and json keys kept apart); :func:`missing_fields` checks a flat set of names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import webdataset as wds

from data_pipelines.batch_fields import BatchFields
from data_pipelines.decode import DATA_ERRORS, IMAGE_MEMBERS
from data_pipelines.shards import listed_sizes
from data_pipelines.sidecar import Sidecar, shard_name
from data_pipelines.tario import iter_keys, iter_samples
from data_pipelines.text_sources import TextSource

IMAGE_FIELDS = frozenset(IMAGE_MEMBERS)


class MissingField(NamedTuple):
    """A field the stream would read that a shard's first sample lacks."""

    field: str
    """The batch field (view, text or json field name)."""
    source: str
    """Where it is read from: ``json key 'summary'``, ``member 'txt'``, ``image member ...``."""
    shard: str

    def __str__(self) -> str:
        return f"field '{self.field}' ({self.source}) is missing in shard {self.shard}"


def _first_sample(url: str) -> tuple[set[str], str, dict[str, Any] | None]:
    """(member suffixes, key, parsed json dict or None) of the shard's first sample."""
    try:
        with wds.gopen(url) as stream:
            first = next(iter_samples(stream, url), None)
    except DATA_ERRORS as error:
        raise ValueError(f"shard '{url}' cannot be read as a tar file: {error}") from error
    if first is None:
        raise ValueError(f"shard '{url}' holds no samples")
    meta = None
    if "json" in first.members:
        try:
            parsed = json.loads(first.members["json"])
        except ValueError as error:
            raise ValueError(f"shard '{url}' sample {first.key}: bad json: {error}") from error
        meta = parsed if isinstance(parsed, dict) else None
    return set(first.members), first.key, meta


def first_sample_fields(url: str) -> set[str]:
    """Member extensions of the shard's first sample, plus the keys of its ``json`` member.

    An image member of any supported type also yields the field ``image``.
    """
    members, _, meta = _first_sample(url)
    fields = members | set(meta or ())
    if fields & IMAGE_FIELDS:
        fields.add("image")
    return fields


def missing_fields(url: str, required: set[str] | frozenset[str]) -> set[str]:
    """The required fields (and ``image``) that the shard's first sample does not carry."""
    return (set(required) | {"image"}) - first_sample_fields(url)


def _carries(source: TextSource, members: set[str], keys: set[str]) -> bool:
    return source.key in (members if source.kind == "member" else keys)


def _where(source: TextSource) -> str:
    return f"member '{source.key}'" if source.kind == "member" else f"json key '{source.key}'"


def missing_batch_fields(
    urls: Sequence[str],
    fields: BatchFields,
    *,
    image_keys: Sequence[str] = IMAGE_MEMBERS,
    shards: int = 1,
) -> list[MissingField]:
    """What the first sample of each of the first ``shards`` shards lacks of ``fields``.

    Checks, per shard, an image member (one of ``image_keys``) for the views, each text
    field's member or json key, and each json field's key; empty when all are there. Start-up
    prints ``str()`` of each ("field 'summary' (json key 'summary') is missing in shard X").

    Raises:
        ValueError: a shard that cannot be read, holds no samples, or has bad json.
    """
    missing: list[MissingField] = []
    # opened here, not from the run's cache (open_sidecar): the file may have been rebuilt since
    opened = {s.path: Sidecar(s.path) for s in fields.sidecars if os.path.isfile(s.path)}
    for url in list(urls)[:shards]:
        members, key, meta = _first_sample(url)
        keys = set(meta or ())
        if not members & set(image_keys):
            where = f"image member, one of {', '.join(image_keys)}"
            missing += [MissingField(view.name, where, url) for view in fields.views]
        for text in fields.texts:
            absent = [_where(s) for s in text.sources if not _carries(s, members, keys)]
            if len(absent) == len(text.sources):  # neither the source nor its fallback
                missing.append(MissingField(text.name, " or ".join(absent), url))
        for value in fields.json:
            if value.source not in keys:
                missing.append(MissingField(value.name, f"json key '{value.source}'", url))
        for array in fields.arrays:
            if array.member not in members:
                missing.append(MissingField(array.name, f"member '{array.member}'", url))
        for sidecar in fields.sidecars:
            if not os.path.isfile(sidecar.path):
                missing.append(MissingField(sidecar.name, f"sidecar file {sidecar.path}", url))
            elif key not in opened[sidecar.path]:
                where = f"key '{key}' in sidecar {sidecar.path}"
                missing.append(MissingField(sidecar.name, where, url))
    return missing


class SidecarGaps(NamedTuple):
    """Training samples a sidecar file has no entry for."""

    missing: int
    total: int
    first: str
    """The first missing sample, ``'key' in shard URL`` (empty when none is missing)."""


def sidecar_gaps(urls: Sequence[str], path: str) -> SidecarGaps:
    """Count the samples of ``urls`` whose key is not in the sidecar ``path``, from what is
    cheap: a shard that the sidecar records with as many samples as ``sizes.json`` lists for
    it is whole (its writer gave every sample it read an entry); only the other shards'
    member names are read (tar headers, not images), each once.

    Raises:
        ValueError: a shard that cannot be read as a tar file; a sidecar of another format
            (:class:`~data_pipelines.sidecar.SidecarFormatError`, naming the command to run).
    """
    sidecar = Sidecar(path)  # not the run's cache (open_sidecar): it may have been rebuilt since
    recorded = sidecar.shards()
    try:
        listed = listed_sizes(urls) if recorded else [None] * len(urls)
    except Exception:  # an unreadable sizes.json: read the shards instead, which names it
        listed = [None] * len(urls)
    missing = total = 0
    first = ""
    for url, size in zip(urls, listed, strict=True):
        if size is not None and recorded.get(shard_name(url)) == size:
            total += size
            continue
        try:
            with wds.gopen(url) as stream:
                keys = list(iter_keys(stream))
        except DATA_ERRORS as error:
            raise ValueError(f"shard '{url}' cannot be read as a tar file: {error}") from error
        absent = np.flatnonzero(~sidecar.contains(keys))
        total += len(keys)
        missing += len(absent)
        if absent.size and not first:
            first = f"'{keys[absent[0]]}' in shard {url}"
    return SidecarGaps(missing, total, first)
