"""Exact resume: a stream restored from ``state_dict()`` continues with the very batches an
uninterrupted stream yields, with prefetching workers, across epochs, at bounded cost."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from torchvision import transforms

import data_pipelines.shard_reader as reader_module
import data_pipelines.worker_stream as stream_module
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import cut_inside_a_member, make_stream


def _augment() -> transforms.Compose:
    """Random crops: equal images after a resume need the per-sample RNG seeding."""
    return transforms.Compose(
        [transforms.RandomResizedCrop(16, scale=(0.3, 1.0)), transforms.ToTensor()]
    )


def _stream(urls: str, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 10)
    kw.setdefault("prefetch_factor", 3)
    return make_stream(urls, _augment(), **kw)


def _take(stream, n: int, *, into: list | None = None) -> list:  # type: ignore[no-untyped-def]
    """n batches, starting a new epoch (a new ``iter``) whenever one ends."""
    out = [] if into is None else into
    while len(out) < n:
        for batch in stream:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _same(a: list, b: list) -> None:  # type: ignore[type-arg]
    assert [x["__key__"] for x in a] == [y["__key__"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


@pytest.mark.parametrize(
    "workers,resampled,stop",
    [
        (2, True, 3),
        (2, True, 4),
        (2, False, 5),
        (2, False, 8),
        (2, False, 11),
        (0, False, 6),
        (0, True, 3),
        (3, True, 7),
    ],  # fmt: skip
)
@pytest.mark.parametrize("in_flight", [1, 4])
def test_resume_sees_exactly_the_uninterrupted_batches(
    shard_dir, workers, resampled, stop, in_flight
):
    """Stops at steps that are and are not multiples of the workers, inside and past the
    first epoch (epoch mode has 8 batches per epoch here: 2 workers of 4), with 3 batches prefetched per
    worker that the interrupted run never consumed."""
    total = 14
    options = {"workers": workers, "resampled": resampled, "seed": 4, "shards_in_flight": in_flight}
    uninterrupted = _take(_stream(shard_dir, **options), total)
    first = _stream(shard_dir, **options)
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive JSON
    second = _stream(shard_dir, **options)
    second.load_state_dict(state)
    _same(head + _take(second, total - stop), uninterrupted)


def test_resume_decodes_nothing_twice_and_rereads_little(tmp_path: Path, monkeypatch) -> None:
    """Restoring reads each shard that holds buffered samples or is in flight once (the
    shards in flight continue from there) and decodes no image before the first new batch's
    samples."""
    write_shards(generate_samples(60, seed=1), tmp_path, samples_per_shard=10)
    first = _stream(str(tmp_path), shuffle_buffer=8, workers=0)
    _take(first, 5)
    state = first.state_dict()
    position = state["positions"]["0"]
    needed = {ref[1] for ref in position["buffer"]} | {shard for shard, _ in position["open"]}
    opened: list[str] = []
    decoded: list[int] = []
    real_gopen, real_decode = reader_module.wds.gopen, stream_module.decode_image
    monkeypatch.setattr(reader_module.wds, "gopen", lambda url, *a, **k: opened.append(url) or real_gopen(url, *a, **k))  # fmt: skip
    monkeypatch.setattr(stream_module, "decode_image", lambda data, **k: decoded.append(1) or real_decode(data, **k))  # fmt: skip
    second = _stream(str(tmp_path), shuffle_buffer=8, workers=0)
    second.load_state_dict(state)
    next(iter(second))
    assert len(decoded) == 4  # one batch: four images, nothing decoded to restore
    # those shards, and the next ones a batch of 4 reaches
    assert len(opened) <= len(needed) + 2


def test_resume_refuses_another_global_batch_or_config(shard_dir: str) -> None:
    """Another worker count resumes (test_stream_elastic.py); another global batch does not."""
    stream = _stream(shard_dir, workers=2)
    _take(stream, 3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="1 micro-batches per step.*this run 2 \\(2 x 1\\)"):
        _stream(shard_dir, workers=2, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another stream configuration"):
        _stream(shard_dir, workers=2, seed=9).load_state_dict(state)


def test_skip_counts_survive_the_resume(tmp_path: Path) -> None:
    samples = list(generate_samples(20, seed=0))
    samples[2]["image"] = samples[12]["image"] = b"not an image"
    write_shards(samples, tmp_path, samples_per_shard=10)
    first = _stream(str(tmp_path), shuffle_buffer=1, resampled=False)
    _take(first, 3)
    second = _stream(str(tmp_path), shuffle_buffer=1, resampled=False)
    second.load_state_dict(first.state_dict())
    assert second.skips.total == first.skips.total >= 1
    assert second.skips.by_shard == first.skips.by_shard


@pytest.mark.parametrize("cut", ["inside a member", "between members"])
@pytest.mark.parametrize("seed", range(3))
def test_a_damaged_shard_resumes_exactly_from_every_position(
    tmp_path: Path, cut: str, seed: int
) -> None:
    """Two shards are cut; a stream saved after any batch resumes into the batches and skip
    counts of the uninterrupted one. Before: a position saved while a cut shard was open past
    its last whole sample re-read that shard to its damage in ``restore`` and crashed."""
    paths = write_shards(generate_samples(30, seed=seed), tmp_path, samples_per_shard=5)
    for path in (paths[1], paths[4]):
        if cut == "inside a member":
            cut_inside_a_member(path)
        else:  # at the header of the shard's last member: no end-of-archive block
            data = Path(path).read_bytes()
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                last = tar.getmembers()[-1]
            Path(path).write_bytes(data[: last.offset])
    options = {"workers": 0, "resampled": False, "seed": seed, "batch_size": 2,
               "shuffle_buffer": 3, "max_skip_fraction": 1.0}  # fmt: skip
    for in_flight in (1, 2):
        options["shards_in_flight"] = in_flight
        total = 14
        whole = _stream(str(tmp_path), **options)
        uninterrupted: list = []  # type: ignore[type-arg]
        states = []
        while len(uninterrupted) < total:  # as _take, saving the position after every batch
            for batch in whole:
                uninterrupted.append(batch)
                states.append(json.loads(json.dumps(whole.state_dict())))
                if len(uninterrupted) == total:
                    break
        assert set(whole.skips.by_shard) == {str(paths[1]), str(paths[4])}
        for stop in range(1, total):
            resumed = _stream(str(tmp_path), **options)
            resumed.load_state_dict(states[stop - 1])
            _same(_take(resumed, total - stop), uninterrupted[stop:])
            assert resumed.skips.by_shard == whole.skips.by_shard, (in_flight, stop)
