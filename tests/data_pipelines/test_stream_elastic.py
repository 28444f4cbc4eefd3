"""Canonical streams: the global batch sequence is a function of (data, seed, global batch,
micro-batch, streams), not of how processes, micro-steps and data workers share it; a position
saved on one layout resumes exactly on another; positions saved before (version 2) still load."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision import transforms

from data_pipelines.stream import TrainStream, merge_states
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import make_stream

M = 4  # micro-batches per step: processes x accum_steps
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (processes, accum_steps)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """16 shards of 6 samples: 8 canonical streams get 2 shards each in epoch mode."""
    out = tmp_path_factory.mktemp("elastic")
    write_shards(generate_samples(96, seed=0), out, samples_per_shard=6)
    return str(out)


def _augment() -> transforms.Compose:
    return transforms.Compose(
        [transforms.RandomResizedCrop(8, scale=(0.3, 1.0)), transforms.PILToTensor()]
    )


def _ranks(
    shards: str, processes: int, accum: int, *, seed: int, resampled: bool, workers: int = 0
) -> list[TrainStream]:
    return [
        make_stream(
            shards,
            _augment(),
            rank=rank,
            world_size=processes,
            batch_size=2,
            seed=seed,
            accum_steps=accum,
            streams=2 * M,
            workers=workers,
            resampled=resampled,
            shuffle_buffer=5,
            shards_in_flight=2,
            prefetch_factor=2,
        )  # fmt: skip
        for rank in range(processes)
    ]


def _forever(stream: TrainStream) -> Iterator[dict[str, Any]]:
    """Micro-batches epoch after epoch (a new ``iter`` whenever one ends), as the trainer."""
    while True:
        yield from stream


def _steps(ranks: list[TrainStream], steps: int) -> list[list[tuple[list[str], torch.Tensor]]]:
    """Per step, the global batch's micro-batches in slot order (rank r's j-th is slot r·k + j):
    keys and pixels (the augmentation)."""
    accum = ranks[0].spec.accum_steps
    feeds = [_forever(stream) for stream in ranks]
    out = []
    for _ in range(steps):
        step = []
        for feed in feeds:
            for _ in range(accum):
                batch = next(feed)
                step.append((batch["__key__"], batch["image"]))
        out.append(step)
    for feed in feeds:
        feed.close()
    return out


def _same(a: list, b: list) -> None:  # type: ignore[type-arg]
    assert [[keys for keys, _ in step] for step in a] == [[keys for keys, _ in step] for step in b]
    for step_a, step_b in zip(a, b, strict=True):
        for (_, pixels_a), (_, pixels_b) in zip(step_a, step_b, strict=True):
            assert torch.equal(pixels_a, pixels_b)


@pytest.mark.parametrize("seed", range(6))
def test_every_layout_gives_the_same_steps_and_resumes_on_any_other(shards: str, seed: int) -> None:
    """For each seed, both modes: every (processes, micro-steps) with 4 micro-batches per step
    gives the same keys and pixels per step; a run stopped after a random step on one layout
    and resumed on another (positions of every rank merged) continues with the same steps."""
    rng = random.Random(seed)
    for resampled in (True, False):
        reference = _steps(_ranks(shards, 1, 4, seed=seed, resampled=resampled), 30)
        for processes, accum in LAYOUTS[1:]:
            _same(
                _steps(_ranks(shards, processes, accum, seed=seed, resampled=resampled), 30),
                reference,
            )
        before, after = rng.sample(LAYOUTS, 2)
        stop = rng.randint(1, 29)
        first = _ranks(shards, *before, seed=seed, resampled=resampled)
        head = _steps(first, stop)
        merged = merge_states([json.loads(json.dumps(s.state_dict())) for s in first])
        second = _ranks(shards, *after, seed=seed, resampled=resampled)
        for stream in second:
            stream.load_state_dict(merged)
        _same(head + _steps(second, 30 - stop), reference)


def test_an_epoch_across_a_layout_change_sees_each_sample_once(shards: str) -> None:
    """Epoch mode: 8 streams x 2 shards of 6 samples, 6 batches of 2 each: an epoch is 12
    steps of 4 micro-batches, 96 samples, each once, when 2 processes stop at step 5 and 1
    process with 4 micro-batches finishes the epoch."""
    first = _ranks(shards, 2, 2, seed=1, resampled=False)
    assert len(first[0]) == 2 * 12
    head = _steps(first, 5)
    merged = merge_states([s.state_dict() for s in first])
    second = _ranks(shards, 1, 4, seed=1, resampled=False)
    second[0].load_state_dict(merged)
    keys = [k for step in head + _steps(second, 12 - 5) for micro, _ in step for k in micro]
    assert len(keys) == len(set(keys)) == 96


def test_data_workers_change_nothing_and_may_change_on_resume(shards: str) -> None:
    """DataLoader worker processes serve every W-th micro-batch of a rank's cycle: 1 process
    with 2 workers, then 2 processes with 1 worker each after a resume, give the in-process
    steps."""
    reference = _steps(_ranks(shards, 1, 4, seed=3, resampled=True), 8)
    first = _ranks(shards, 1, 4, seed=3, resampled=True, workers=2)
    assert first[0].spec.workers == 2
    head = _steps(first, 3)
    merged = merge_states([s.state_dict() for s in first])
    second = _ranks(shards, 2, 2, seed=3, resampled=True, workers=1)
    for stream in second:
        stream.load_state_dict(merged)
    _same(head + _steps(second, 5), reference)


def test_workers_are_the_most_that_divide_the_cycle(shards: str) -> None:
    """Each worker serves whole streams: 8 streams of 2 micro-batches per step on one process
    make a cycle of 8 micro-batches, served by 2 of the 3 workers asked for."""
    (stream,) = _ranks(shards, 1, 2, seed=0, resampled=True, workers=3)
    assert (stream.spec.cycle, stream.spec.workers) == (8, 2)


def test_another_global_batch_or_config_is_refused(shards: str) -> None:
    first = _ranks(shards, 2, 2, seed=0, resampled=True)
    _steps(first, 2)
    merged = merge_states([s.state_dict() for s in first])
    (other_batch,) = _ranks(shards, 1, 2, seed=0, resampled=True)  # 2 micro-batches per step
    with pytest.raises(ValueError, match="4 micro-batches per step.*this run 2"):
        other_batch.load_state_dict(merged)
    (other_seed,) = _ranks(shards, 1, 4, seed=9, resampled=True)
    with pytest.raises(ValueError, match="another stream configuration"):
        other_seed.load_state_dict(merged)
    (other_streams,) = _ranks(shards, 1, 4, seed=0, resampled=True)
    other_streams.settings = dataclasses.replace(other_streams.settings, streams=4 * M)
    with pytest.raises(
        ValueError, match="has 8 canonical streams.*data.streams=16: resume with data.streams=8"
    ):
        other_streams.load_state_dict(merged)
    (one_rank,) = _ranks(shards, 1, 4, seed=0, resampled=True)
    with pytest.raises(
        ValueError, match="no position for stream .* of rank 0: pass the positions of every rank"
    ):
        one_rank.load_state_dict(first[1].state_dict())


@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_positions_saved_before_canonical_streams_resume_on_any_layout(
    tmp_path: Path, mode: str
) -> None:
    """``data/positions_v2.json``: two ranks' positions after 3 batches and their next 4 batches'
    keys, written by the stream before canonical streams (2 processes x 2 data workers, batch 3,
    seed 5) on shards the test writes again. They resume on that layout and on 1 process with
    2 micro-batches per step. Their fingerprint hashes the shards' paths then, so it is replaced
    by this run's (which is the fingerprint before canonical streams: test_stream_fields.py)."""
    saved = json.loads((Path(__file__).parent / "data" / "positions_v2.json").read_text())[mode]
    write_shards(generate_samples(60, seed=0), tmp_path, samples_per_shard=6)

    def ranks(processes: int, accum: int, **streams: int) -> list[TrainStream]:
        return [
            make_stream(
                str(tmp_path),
                transforms.Compose(
                    [transforms.RandomResizedCrop(16, scale=(0.3, 1.0)), transforms.ToTensor()]
                ),
                rank=rank,
                world_size=processes,
                accum_steps=accum,
                batch_size=3,
                seed=5,
                shuffle_buffer=7,
                resampled=mode == "resampled",
                shards_in_flight=2,
                **streams,
            )  # fmt: skip
            for rank in range(processes)
        ]

    for state in saved["states"]:
        state["fingerprint"] = ranks(2, 1, streams=4)[0].spec.fingerprint()  # 2 workers each
    for rank, stream in enumerate(ranks(2, 1)):
        stream.load_state_dict(saved["states"][rank])
        assert [step[0][0] for step in _steps([stream], 4)] == saved["next_keys"][rank]
    with pytest.raises(
        ValueError, match="before canonical streams .* by 2 processes; .* this run has 4"
    ):
        ranks(2, 2)[0].load_state_dict(saved["states"][0])  # its accum_steps is not on record
    (one,) = ranks(1, 2)
    one.load_state_dict(merge_states(saved["states"]))
    steps = _steps([one], 4)
    assert [[keys for keys, _ in step] for step in steps] == [
        [saved["next_keys"][0][i], saved["next_keys"][1][i]] for i in range(4)
    ]


def test_a_redrawn_stream_is_a_sequence_of_its_own_that_resumes(shards: str) -> None:
    """``train.elastic=rescale_lr``: at another global batch the stream is drawn afresh from
    (seed, step); its positions say so, and resume into the same new sequence. Epoch mode
    refuses (the epoch would begin again)."""
    (plain,) = _ranks(shards, 1, 4, seed=2, resampled=True)
    (redrawn,) = _ranks(shards, 1, 4, seed=2, resampled=True)
    redrawn.redraw(7)
    head = _steps([redrawn], 3)
    assert [k for k, _ in head[0]] != [k for k, _ in _steps([plain], 1)[0]]
    state = json.loads(json.dumps(redrawn.state_dict()))
    assert state["redrawn_at"] == 7
    tail = _steps([redrawn], 2)
    (resumed,) = _ranks(shards, 1, 4, seed=2, resampled=True)
    resumed.load_state_dict(state)
    _same(_steps([resumed], 2), tail)
    (epoch,) = _ranks(shards, 1, 4, seed=2, resampled=False)
    with pytest.raises(ValueError, match="rescale_lr needs data.resampled=true"):
        epoch.redraw(7)
