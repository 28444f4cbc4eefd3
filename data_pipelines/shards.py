"""Shard lists: expand URL patterns and count samples from ``sizes.json`` or tar headers."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence

import braceexpand
import webdataset as wds

Urls = str | os.PathLike[str] | Sequence[str]


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    return url.removeprefix("file://")


def expand_patterns(urls: Urls) -> list[str]:
    """Expand shard URLs: brace patterns, a list of them, or a directory (all its ``*.tar``).

    Unlike :func:`expand_urls` this does not check that the shards exist, so that a validator
    can report a missing shard as one problem among others. Raises ``FileNotFoundError`` naming
    the pattern when nothing matches.
    """
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    patterns = [urls] if isinstance(urls, str) else [os.fspath(u) for u in urls]
    result: list[str] = []
    for pattern in patterns:
        if _is_local(pattern) and os.path.isdir(_local_path(pattern)):
            result.extend(sorted(glob.glob(os.path.join(_local_path(pattern), "*.tar"))))
        else:
            result.extend(braceexpand.braceexpand(pattern))
    if not result:
        raise FileNotFoundError(f"no shards match {urls!r}")
    return result


def expand_urls(urls: Urls) -> list[str]:
    """Expand shard URLs like :func:`expand_patterns`, and check that local shards exist.

    Raises ``FileNotFoundError`` naming the pattern when nothing matches or a local shard is
    missing, so a typo fails at construction instead of as an empty (hanging) stream.
    """
    result = expand_patterns(urls)
    missing = [u for u in result if _is_local(u) and not os.path.exists(_local_path(u))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(result)} shards from {urls!r} do not exist, e.g. {missing[0]}"
        )
    return result


def split_sources(
    urls: Urls, weights: Sequence[float] | None = None
) -> tuple[list[str], list[float]]:
    """Expand ``::``-joined sources (open_clip's syntax) into shards and per-shard weights.

    Each shard gets the weight of its source (``weights``: one per source, default 1 each), so
    resampling draws a source's shards in proportion to its weight, as open_clip's upsampling
    factors do. A list (or path) is one source.

    Raises:
        ValueError: a weight count that differs from the number of sources, or a weight <= 0.
    """
    if isinstance(urls, str):
        sources: list[Urls] = [part for part in urls.split("::") if part]
    else:
        sources = [urls]
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources) or any(w <= 0 for w in weights):
        raise ValueError(
            f"data.train_weights needs one positive weight per '::' source: {len(sources)} "
            f"sources, weights {list(weights)}"
        )
    shards: list[str] = []
    per_shard: list[float] = []
    for source, weight in zip(sources, weights, strict=True):
        expanded = expand_urls(source)
        shards.extend(expanded)
        per_shard.extend([float(weight)] * len(expanded))
    return shards, per_shard


def _count_tar_samples(path: str) -> int:
    keys = set()
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isreg() and "." in base and not base.startswith("__"):
                keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def _sizes_table(folder: str, *, local: bool) -> dict[str, int]:
    """``sizes.json`` of a shard folder (local or remote, through webdataset's openers)."""
    path = f"{folder}/sizes.json" if folder else "sizes.json"
    try:
        if local:
            if not os.path.exists(path):
                return {}
            with open(path, "rb") as f:
                table = json.load(f)
        else:
            with wds.gopen(path) as f:
                table = json.load(f)
    except FileNotFoundError:
        return {}
    return {str(k): int(v) for k, v in table.items()}


def listed_sizes(urls: Sequence[str]) -> list[int | None]:
    """Each shard's count in the ``sizes.json`` next to it; None where it is not listed."""
    tables: dict[str, dict[str, int]] = {}
    listed: list[int | None] = []
    for url in urls:
        folder, name = os.path.split(_local_path(url))
        if folder not in tables:
            tables[folder] = _sizes_table(folder, local=_is_local(url))
        listed.append(tables[folder].get(name))
    return listed


def listed_shards(folder: str) -> list[str]:
    """Paths of the shards that a local folder's ``sizes.json`` lists, present or not."""
    return [os.path.join(folder, name) for name in _sizes_table(folder, local=True)]


def shard_sizes(urls: Urls) -> list[int]:
    """Samples per shard, in ``expand_urls`` order: from ``sizes.json`` next to the shards when
    it lists them, else by reading the tar headers (local shards only)."""
    expanded = expand_urls(urls)
    sizes = []
    for url, listed in zip(expanded, listed_sizes(expanded), strict=True):
        if listed is not None:
            sizes.append(listed)
        elif _is_local(url):
            sizes.append(_count_tar_samples(_local_path(url)))
        else:
            raise ValueError(f"cannot count samples of remote shard {url}: no sizes.json entry")
    return sizes


def count_samples(urls: Urls) -> int:
    """Total number of samples in the shards (``sizes.json`` when present, else tar headers)."""
    return sum(shard_sizes(urls))
