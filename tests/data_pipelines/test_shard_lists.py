"""Shard lists at LAION's size: building a stream costs one listing per folder, not a ``stat``
or a brace-pattern parse per shard (every rank pays it before its first batch)."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

import braceexpand
import pytest

from data_pipelines.shards import expand_patterns, expand_urls, shard_sizes

from .conftest import make_stream, preprocess


def _folder(root: Path, shards: int) -> Path:
    """``shards`` empty shards listed in a ``sizes.json`` (a build reads no shard)."""
    root.mkdir()
    names = [f"{i:06d}.tar" for i in range(shards)]
    for name in names:
        (root / name).touch()
    (root / "sizes.json").write_text(json.dumps(dict.fromkeys(names, 40)))
    return root


def _counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts of ``os.stat`` (exists, isdir, ...) and brace-pattern parses from now on."""
    calls: Counter[str] = Counter()
    stat, expand = os.stat, braceexpand.braceexpand

    def counted_stat(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["stat"] += 1
        return stat(*args, **kwargs)

    def counted_expand(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["braceexpand"] += 1
        return expand(*args, **kwargs)

    monkeypatch.setattr(os, "stat", counted_stat)
    monkeypatch.setattr(braceexpand, "braceexpand", counted_expand)
    return calls


def _calls(monkeypatch: pytest.MonkeyPatch, folder: Path, shards: int) -> dict[str, Counter[str]]:
    names = [str(folder / f"{i:06d}.tar") for i in range(shards)]
    per_use: dict[str, Counter[str]] = {}
    uses = {
        "folder": lambda: expand_urls(str(folder)),
        "list": lambda: expand_urls(names),
        "braces": lambda: expand_urls(f"{folder}/{{000000..{shards - 1:06d}}}.tar"),
        "sizes": lambda: shard_sizes(str(folder)),
        "epoch stream": lambda: make_stream(
            str(folder), preprocess(), batch_size=4, resampled=False, workers=1
        ),
    }
    for use, build in uses.items():
        with monkeypatch.context() as patch:
            per_use[use] = _counted(patch)
            build()
    return per_use


def test_stats_and_pattern_parses_do_not_grow_with_the_number_of_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    few = _calls(monkeypatch, _folder(tmp_path / "few", 8), 8)
    many = _calls(monkeypatch, _folder(tmp_path / "many", 800), 800)
    assert many == few, (few, many)
    assert all(calls["stat"] <= 4 and calls["braceexpand"] <= 1 for calls in many.values()), many


def test_a_folder_expands_as_glob_lists_it(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "shards", 5)
    (folder / ".hidden.tar").touch()
    (folder / "notes.txt").touch()
    (folder / "upper.TAR").touch()
    (folder / "sub.tar").mkdir()
    expected = sorted(glob.glob(os.path.join(folder, "*.tar")))
    assert expand_urls(str(folder)) == expected == expand_patterns(folder)
    assert expand_urls(f"file://{folder}") == expected


def test_a_missing_shard_of_a_list_or_pattern_is_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "shards", 5)
    listed = [str(folder / f"{i:06d}.tar") for i in range(5)]
    with pytest.raises(FileNotFoundError, match=r"1 of 6 shards .* e\.g\. .*000007\.tar"):
        expand_urls([*listed, str(folder / "000007.tar")])
    with pytest.raises(FileNotFoundError, match=r"2 of 7 shards .* e\.g\. .*000005\.tar"):
        expand_urls(f"{folder}/{{000000..000006}}.tar")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_urls(str(tmp_path / "nowhere" / "000000.tar"))
    remote = ["s3://bucket/a.tar", "pipe:cat x.tar"]
    assert expand_urls(remote) == remote  # remote shards are not checked at build
