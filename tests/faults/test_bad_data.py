"""Faults a real run meets, injected end to end: bad data, non-finite losses, a dying shard
server, a dying data worker. Each run is short (a tiny model, a few steps, batch 8) and bounded
in time: a fault must end in a clear message, never a hang or a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.synthetic import generate_samples
from tests.data_pipelines.conftest import write_tar

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "launch" / "configs" / "demo.yaml"


def write_corrupt_shards(folder: Path, *, shards: int, per_shard: int, bad_every: int) -> str:
    """Shards whose every ``bad_every``-th sample (``bad_every`` < 0: all but every
    ``-bad_every``-th) has a JPEG cut to a third; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = iter(generate_samples(shards * per_shard, seed=0))
    for s in range(shards):
        members = []
        for i in range(per_shard):
            sample = next(samples)
            buffer = io.BytesIO()
            sample["image"].save(buffer, format="JPEG")
            jpeg = buffer.getvalue()
            bad = i % bad_every == 0 if bad_every > 0 else i % -bad_every != 0
            jpeg = jpeg[: len(jpeg) // 3] if bad else jpeg
            members.append((sample["key"], {"jpg": jpeg, "txt": sample["txt"].encode()}))
        write_tar(folder / f"{s:05d}.tar", members)
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def overrides(shards: str, out: Path, **extra: object) -> list[str]:
    """A tiny run: 8-sample batches, one worker, a short shuffle buffer, a log line per step."""
    values = {
        "data.train_shards": shards,
        "data.batch_size": 8,
        "data.workers": 1,
        "data.shuffle_buffer": 8,
        "data.batch_timeout": 60,
        "train.steps": 6,
        "train.log_every": 1,
        "train.checkpoint_every": 0,
        "train.out_dir": out,
        "optim.warmup_steps": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def pretrain(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python launch/pretrain.py --config demo.yaml ARGS``, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(DEMO), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


@pytest.mark.slow
def test_too_many_bad_samples_stop_the_run_with_one_message_logged_and_counts_written(
    tmp_path: Path,
) -> None:
    shards = write_corrupt_shards(tmp_path / "shards", shards=4, per_shard=25, bad_every=-5)
    out = tmp_path / "run"
    done = pretrain(overrides(shards, out, **{"train.steps": 40}))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "data.max_skip_fraction" in line]
    assert len(lines) == 1 and lines[0].startswith("vlp: error: "), done.stderr
    message = lines[0].removeprefix("vlp: error: ")
    assert "samples skipped" in message and "worst shards" in message
    assert message in (out / "train.log").read_text()
    counts = json.loads((out / "data_skips_rank0.json").read_text())
    assert counts["skipped"] > 2 * counts["ok"] > 0  # 4 of 5 bad; good ones lead each shard


def _config(shards: str, out: Path, **extra: object):  # type: ignore[no-untyped-def]
    from vlp.config import load_config

    return load_config(DEMO, overrides(shards, out, **extra))


@pytest.mark.slow
def test_non_finite_losses_in_a_row_stop_naming_step_and_losses_and_the_last_checkpoint_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss turns NaN from the 3rd step on: each NaN step is skipped and counted, the
    ``train.max_nonfinite_steps + 1``-th in a row stops the run with a message naming the step
    and the loss parts, and the step-2 checkpoint (written before) resumes."""
    from launch.run import RunStopped, train
    from vlp.objectives import objective_class

    shards = write_corrupt_shards(tmp_path / "shards", shards=2, per_shard=20, bad_every=10**6)
    clip = objective_class("clip")
    forward, calls = clip.forward, []

    def nan_from_step_3(self, outputs, batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        parts = forward(self, outputs, batch)
        return {k: v * float("nan") for k, v in parts.items()} if len(calls) >= 3 else parts

    monkeypatch.setattr(clip, "forward", nan_from_step_3)
    out = tmp_path / "run"
    extra = {
        "train.checkpoint_every": 1,
        "train.keep_checkpoints": 5,
        "train.max_nonfinite_steps": 2,
    }
    with pytest.raises(RunStopped) as stopped:
        train(_config(shards, out, **extra))
    message = str(stopped.value)
    assert "3 non-finite losses in a row at step 3" in message and "contrastive_loss" in message
    assert message in (out / "train.log").read_text()
    assert len(calls) == 2 + 3
    checkpoint = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000001",
        checkpoint.name,
    ]

    monkeypatch.setattr(clip, "forward", forward)
    resumed = train(_config(shards, tmp_path / "resumed", **{"train.resume": checkpoint}))
    assert resumed.step == 6 and resumed.nonfinite_steps == 0


@pytest.mark.slow
def test_a_run_over_5_percent_corrupt_samples_completes_and_reports_the_counts(
    tmp_path: Path,
) -> None:
    from launch.run import train

    shards = write_corrupt_shards(tmp_path / "shards", shards=2, per_shard=20, bad_every=20)
    out = tmp_path / "run"
    result = train(_config(shards, out))
    assert result.step == 6
    counts = json.loads((out / "data_skips_rank0.json").read_text())
    # The bad sample leads each shard and 8 shards are read at once, so the first batches over-
    # sample it: the count is what was read, not 5 % of it.
    assert counts["ok"] >= 6 * 8 and counts["skipped"] > 0
    assert set(counts["by_shard"]) <= {f"{tmp_path}/shards/0000{i}.tar" for i in (0, 1)}
    assert f"rank 0 skipped {counts['skipped']} bad samples" in (out / "train.log").read_text()


def _stream(urls: str, **kw: object):  # type: ignore[no-untyped-def]
    from torchvision import transforms

    from tests.data_pipelines.conftest import make_stream

    kw = {"batch_size": 4, "shuffle_buffer": 1, "resampled": True, **kw}
    return make_stream(urls, kw.pop("preprocess", transforms.ToTensor()), **kw)


def test_a_shard_server_that_dies_mid_run_is_retried_with_backoff_then_a_clear_error(
    tmp_path: Path,
) -> None:
    import time

    from data_pipelines.remote import RemoteShardError
    from data_pipelines.write import write_shards
    from tests.data_pipelines.http_server import serve

    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    with serve(tmp_path) as base:
        stream = _stream(f"{base}/{{00000..00001}}.tar", remote_timeout=2.0, remote_retries=2)
        batches = iter(stream)
        for _ in range(3):  # the run is under way
            next(batches)
    started = time.monotonic()  # the server is gone: each re-open is refused at once
    with pytest.raises(RemoteShardError, match=rf"shard {base}/0000[01].tar: .* 2 retries"):
        for _ in range(100):
            next(batches)
    waited = time.monotonic() - started
    assert 0.5 + 1.0 <= waited < 30  # two backoffs (0.5 s, 1 s) before giving up; no hang


def _die_on_fifth(image):  # type: ignore[no-untyped-def]
    from torchvision.transforms import functional

    _die_on_fifth.calls = getattr(_die_on_fifth, "calls", 0) + 1  # type: ignore[attr-defined]
    if _die_on_fifth.calls == 5:  # type: ignore[attr-defined]
        os._exit(3)  # a worker killed mid-epoch (OOM killer, segfault in a codec)
    return functional.to_tensor(image)


def test_a_dead_data_worker_is_an_error_naming_the_worker_and_its_shard(tmp_path: Path) -> None:
    import time

    from data_pipelines.write import write_shards

    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    stream = _stream(str(tmp_path), workers=1, batch_size=2, preprocess=_die_on_fifth)
    started = time.monotonic()
    with pytest.raises(
        RuntimeError,
        match=rf"data worker 0 of rank 0 .*exited unexpectedly.*{tmp_path}/0000[01].tar",
    ):
        for _ in stream:
            pass
    assert time.monotonic() - started < 30


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["remote", "worker"])
def test_a_dead_shard_server_or_data_worker_stops_the_run_with_one_redacted_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """What the stream raises (tested above) reaches `vlp train` as one line in train.log and
    RunStopped, not a traceback; a token in the shard URL is masked."""
    import launch.run
    from data_pipelines.remote import RemoteShardError
    from data_pipelines.stream import DataWorkerDied
    from launch.run import RunStopped, train

    shards = write_corrupt_shards(tmp_path / "shards", shards=2, per_shard=20, bad_every=10**6)
    url = "https://host/shard-00001.tar?token=SECRET"
    error = (
        RemoteShardError(f"Caught RemoteShardError in DataLoader worker process 0.\n"
                         f"Original Traceback (most recent call last):\n  ...\n"
                         f"RemoteShardError: shard {url}: timed out after 2 retries")
        if kind == "remote"
        else DataWorkerDied(f"data worker 0 of rank 0 exited unexpectedly while reading {url}")
    )  # fmt: skip
    real = launch.run.build_stream

    def dies_after_two_batches(*args, **kwargs):  # type: ignore[no-untyped-def]
        stream = real(*args, **kwargs)

        class Dying:
            def __iter__(self):  # type: ignore[no-untyped-def]
                batches = iter(stream)
                yield next(batches)
                yield next(batches)
                raise error

        return Dying()

    monkeypatch.setattr(launch.run, "build_stream", dies_after_two_batches)
    out = tmp_path / "run"
    with pytest.raises(RunStopped) as stopped:
        train(_config(shards, out))
    message = str(stopped.value)
    assert "\n" not in message and "SECRET" not in message and "token=***" in message
    assert message in (out / "train.log").read_text()
