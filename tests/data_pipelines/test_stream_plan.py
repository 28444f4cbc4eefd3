"""The shard plan at scale: the same deal as the plain least-loaded rule, and per-sample work that
does not grow with the number of shards."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest

from data_pipelines import shard_reader, stream_plan
from data_pipelines.stream_plan import StreamId, StreamSpec, derive_seed, epoch_plan
from data_pipelines.synthetic import generate_samples
from data_pipelines.tario import RawSample
from data_pipelines.write import write_shards

from .conftest import make_stream, preprocess


def _spec(sizes: list[int], world_size: int, workers: int, seed: int, **kw: object) -> StreamSpec:
    return StreamSpec(
        urls=tuple(f"shard-{i:06d}.tar" for i in range(len(sizes))),
        weights=(1.0,) * len(sizes), batch_size=4, seed=seed, rank=0, world_size=world_size,
        workers=workers, resampled=False, shuffle_buffer=0, first_epoch=0, image_keys=("jpg",),
        text_key="txt", caption_field=None, extra_keys=(), draft_size=None, max_pixels=0,
        max_consecutive_errors=10, remote_timeout=1.0, remote_retries=0, sizes=tuple(sizes),
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _least_loaded_deal(spec: StreamSpec, epoch: int) -> list[list[int]]:
    """The rule written plainly: each shard of the seeded shuffle to the slot with the least
    load, then the fewest shards, then the lowest number (a linear scan per shard)."""
    order = list(range(len(spec.urls)))
    random.Random(derive_seed(spec.seed, epoch)).shuffle(order)
    slots = spec.world_size * spec.workers
    shards: list[list[int]] = [[] for _ in range(slots)]
    loads = [0] * slots
    for index in order:
        slot = min(range(slots), key=lambda s: (loads[s], len(shards[s]), s))
        shards[slot].append(index)
        loads[slot] += spec.sizes[index]
    return shards


@pytest.mark.parametrize("seed", range(12))
def test_the_deal_is_the_least_loaded_rule_for_every_seed(seed: int) -> None:
    """Equal sizes (ties everywhere), uneven sizes, and more slots than a few shards each."""
    rng = random.Random(seed)
    for sizes, world, workers in [
        ([10] * 37, 3, 2),
        ([rng.randint(1, 50) for _ in range(200)], 4, 3),
        ([rng.choice([5, 10_000]) for _ in range(64)], 8, 4),
    ]:
        spec = _spec(sizes, world, workers, seed)
        for epoch in (0, 1, 5):
            plan = epoch_plan(spec, epoch)
            flat = [plan[stream] for stream in sorted(plan, key=spec.deal_slot)]
            assert flat == _least_loaded_deal(spec, epoch)


def test_the_deal_at_4096_slots_is_not_quadratic() -> None:
    """Counted, not timed: the Python and C calls the deal makes (a profile hook sees each)
    grow with the shards, not with shards x slots (a scan of every slot per shard: 41M calls)."""
    spec = _spec([100] * 10_000, 512, 8, seed=0)
    stream_plan._epoch_deal.cache_clear()
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        shards, loads = stream_plan._epoch_deal(spec, 0)
    finally:
        sys.setprofile(None)
    assert sorted(i for slot in shards for i in slot) == list(range(10_000))
    assert max(loads) - min(loads) <= 100
    assert calls <= 10 * 10_000 + 4 * 4096


def test_urls_are_resolved_once_per_shard_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per sample, the reader reuses its open shards' URLs; a shard's URL is worked out when the
    shard opens (resampled: one weighted draw; epoch mode: one index)."""
    write_shards(generate_samples(60, seed=0), tmp_path, samples_per_shard=10)
    real_url, real_samples = stream_plan.WorkerShards.url, shard_reader._samples
    for resampled in (True, False):
        resolved, opened = 0, 0

        def count_url(self: stream_plan.WorkerShards, index: int) -> str:
            nonlocal resolved
            resolved += 1
            return real_url(self, index)

        def count_open(url: str, first: int) -> Iterator[RawSample]:
            nonlocal opened
            opened += 1
            return real_samples(url, first)

        monkeypatch.setattr(stream_plan.WorkerShards, "url", count_url)
        monkeypatch.setattr(shard_reader, "_samples", count_open)
        stream = make_stream(
            str(tmp_path), preprocess(), batch_size=5, workers=0, resampled=resampled,
            shuffle_buffer=0, shards_in_flight=2,
        )  # fmt: skip
        batches = list(islice(iter(stream), 10))
        assert len(batches) == 10 and opened >= 5
        assert resolved == opened


def test_a_resampled_shard_is_the_weighted_draw_it_was(tmp_path: Path) -> None:
    """The cumulative weights are summed once; each draw is still ``choices(urls, weights)``
    from the draw's own seed (positions saved before keep resuming)."""
    weights = tuple(random.Random(0).uniform(0.1, 3.0) for _ in range(1000))
    spec = replace(_spec([1] * 1000, 2, 2, seed=3), resampled=True, weights=weights, rank=1)
    shards = stream_plan.WorkerShards(spec, StreamId(slot=spec.rank, phase=1), epoch=0)
    for index in range(300):
        draw = random.Random(derive_seed(spec.seed, spec.rank, 1, index, 11))
        assert shards.url(index) == draw.choices(spec.urls, weights=weights)[0]
