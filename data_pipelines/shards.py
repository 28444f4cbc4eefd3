"""Shard lists: expand URL patterns and count samples from ``sizes.json`` or tar headers."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence

import braceexpand

Urls = str | os.PathLike[str] | Sequence[str]


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    return url.removeprefix("file://")


def expand_urls(urls: Urls) -> list[str]:
    """Expand shard URLs: brace patterns, a list of them, or a directory (all its ``*.tar``).

    Raises ``FileNotFoundError`` naming the pattern when nothing matches or a local shard is
    missing, so a typo fails at construction instead of as an empty (hanging) stream.
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
    missing = [u for u in result if _is_local(u) and not os.path.exists(_local_path(u))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(result)} shards from {urls!r} do not exist, e.g. {missing[0]}"
        )
    return result


def _count_tar_samples(path: str) -> int:
    keys = set()
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isreg() and "." in base and not base.startswith("__"):
                keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    return len(keys)


def shard_sizes(urls: Urls) -> list[int]:
    """Samples per shard, in ``expand_urls`` order: from ``sizes.json`` next to the shards when
    it lists them, else by reading the tar headers (local shards only)."""
    expanded = expand_urls(urls)
    tables: dict[str, dict[str, int]] = {}
    sizes = []
    for url in expanded:
        folder, name = os.path.split(_local_path(url))
        if folder not in tables:
            path = os.path.join(folder, "sizes.json")
            tables[folder] = {}
            if _is_local(url) and os.path.exists(path):
                with open(path) as f:
                    tables[folder] = {str(k): int(v) for k, v in json.load(f).items()}
        if name in tables[folder]:
            sizes.append(tables[folder][name])
        elif _is_local(url):
            sizes.append(_count_tar_samples(_local_path(url)))
        else:
            raise ValueError(f"cannot count samples of remote shard {url}: no sizes.json entry")
    return sizes


def count_samples(urls: Urls) -> int:
    """Total number of samples in the shards (``sizes.json`` when present, else tar headers)."""
    return sum(shard_sizes(urls))
