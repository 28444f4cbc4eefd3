"""Shard lists: expand URL patterns and count samples from ``sizes.json`` or tar headers."""

from __future__ import annotations

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


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _folder_shards(folder: str) -> list[str]:
    """The ``*.tar`` files of a local folder (not hidden ones, as ``glob`` would), sorted: one
    listing of the folder, whatever the number of shards."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.endswith(".tar") and not e.name.startswith(".")]
    return [os.path.join(folder, name) for name in sorted(names)]


def _expand_one(pattern: str) -> tuple[list[str], bool]:
    """A pattern's shards, and whether they come from listing a folder (so they exist).

    Only a local pattern that does not name a tar file may be a folder (a list of 400,000 shard
    paths costs no ``stat`` here), and only a pattern with braces or escapes is parsed."""
    if _is_local(pattern) and not pattern.endswith(_SHARD_SUFFIXES):
        if os.path.isdir(_local_path(pattern)):
            return _folder_shards(_local_path(pattern)), True
    if "{" not in pattern and "\\" not in pattern:
        return [pattern], False
    return list(braceexpand.braceexpand(pattern)), False


def _patterns(urls: Urls) -> list[str]:
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    return [urls] if isinstance(urls, str) else [os.fspath(u) for u in urls]


def expand_patterns(urls: Urls) -> list[str]:
    """Expand shard URLs: brace patterns, a list of them, or a directory (all its ``*.tar``).

    Unlike :func:`expand_urls` this does not check that the shards exist, so that a validator
    can report a missing shard as one problem among others. Raises ``FileNotFoundError`` naming
    the pattern when nothing matches.
    """
    result = [url for pattern in _patterns(urls) for url in _expand_one(pattern)[0]]
    if not result:
        raise FileNotFoundError(f"no shards match {urls!r}")
    return result


def _missing_local(urls: Sequence[str]) -> list[str]:
    """The local shards of ``urls`` that do not exist: one listing per folder, not a ``stat``
    per shard (on a network file system, 512 ranks stat-ing 400,000 shards each is 2·10^8
    metadata requests before the first step)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for url in urls:
        if not _is_local(url):
            continue
        folder, name = os.path.split(_local_path(url))
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(url)
    return missing


def expand_urls(urls: Urls) -> list[str]:
    """Expand shard URLs like :func:`expand_patterns`, and check that local shards exist.

    Raises ``FileNotFoundError`` naming the pattern when nothing matches or a local shard is
    missing, so a typo fails at construction instead of as an empty (hanging) stream.
    """
    result, unlisted = [], []
    for pattern in _patterns(urls):
        shards, listed = _expand_one(pattern)
        result.extend(shards)
        if not listed:
            unlisted.extend(shards)
    if not result:
        raise FileNotFoundError(f"no shards match {urls!r}")
    if missing := _missing_local(unlisted):
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
    return sizes_of(expand_urls(urls))


def sizes_of(shards: Sequence[str]) -> list[int]:
    """Samples per shard of an expanded shard list, as :func:`shard_sizes` counts them."""
    sizes = []
    for url, listed in zip(shards, listed_sizes(shards), strict=True):
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
