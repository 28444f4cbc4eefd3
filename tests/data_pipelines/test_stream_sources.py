"""Shard plans: several weighted sources, disjoint epochs across ranks and workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import make_stream, preprocess


def _stream(urls, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("shuffle_buffer", 1)
    return make_stream(urls, preprocess(), **kw)


def test_two_sources_are_drawn_by_their_weights(tmp_path: Path) -> None:
    """Weights [1, 3]: a quarter of the samples from source a (shards of 2 samples, 800 samples
    = 400 shard draws, so the binomial standard deviation of the share is 0.022; ±0.08 is
    3.7 of them)."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(generate_samples(20, seed=0), a, samples_per_shard=2)
    renamed = [{**s, "key": "b" + s["key"][1:]} for s in generate_samples(20, seed=1)]
    write_shards(renamed, b, samples_per_shard=2)
    stream = _stream(f"{a}::{b}", weights=[1, 3], batch_size=8, seed=7)
    keys = [key for _, batch in zip(range(100), stream, strict=False) for key in batch["__key__"]]
    share_a = sum(not key.startswith("b") for key in keys) / len(keys)
    assert len(keys) == 800 and abs(share_a - 0.25) < 0.08, share_a


def test_two_ranks_two_workers_read_disjoint_shards_in_an_epoch(tmp_path: Path) -> None:
    """8 shards of 5: each (rank, worker) gets 2 shards; one epoch = 4 batches of 5 per rank,
    which together are every sample exactly once."""
    write_shards(generate_samples(40, seed=0), tmp_path, samples_per_shard=5)
    per_rank = []
    for rank in range(2):
        stream = _stream(
            str(tmp_path), resampled=False, batch_size=5, rank=rank, world_size=2, workers=2
        )
        batches = list(stream)
        assert len(batches) == len(stream) == 4
        per_rank.append([key for batch in batches for key in batch["__key__"]])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == 40


def test_unequal_shards_still_give_every_rank_the_same_batch_count(tmp_path: Path) -> None:
    """Shards of 9, 9, 9 and 3 samples: rank 1 may own far fewer samples, but both ranks yield
    len(stream) batches per epoch (a short rank moves on to its next epoch's shards)."""
    write_shards(generate_samples(30, seed=0), tmp_path, samples_per_shard=9)
    counts = [
        len(list(_stream(str(tmp_path), resampled=False, batch_size=4, rank=r, world_size=2)))
        for r in range(2)
    ]
    assert counts == [30 // 8, 30 // 8]


def test_weights_need_one_per_source_and_resampling(tmp_path: Path) -> None:
    write_shards(generate_samples(4, seed=0), tmp_path / "a", samples_per_shard=2)
    with pytest.raises(ValueError, match="one positive weight per '::' source: 2 sources"):
        _stream(f"{tmp_path}/a::{tmp_path}/a", weights=[1], batch_size=2)
    with pytest.raises(ValueError, match="need resampled=True"):
        _stream(f"{tmp_path}/a::{tmp_path}/a", weights=[1, 2], batch_size=2, resampled=False)
