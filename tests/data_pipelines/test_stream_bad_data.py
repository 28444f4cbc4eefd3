"""Bad data is skipped and counted per shard (only data errors); the stream never hangs."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data_pipelines import stream as stream_module
from data_pipelines.remote import RemoteShardError
from data_pipelines.stream import BatchTimeout
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import cut_inside_a_member, make_stream, write_tar
from .http_server import serve


def _encode(image: Image.Image, fmt: str, **options) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _stream(urls, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("batch_size", 1)
    kw.setdefault("shuffle_buffer", 1)
    kw.setdefault("resampled", False)
    kw.setdefault("preprocess", transforms.ToTensor())
    return make_stream(urls, **kw)


RGB = Image.new("RGB", (24, 16), (200, 30, 30))


def _bad_and_good() -> tuple[list[tuple[str, dict[str, bytes]]], set[str]]:
    jpeg = _encode(RGB, "JPEG")
    rotated = Image.new("RGB", (24, 16))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90°
    good = {
        "good": {"jpg": jpeg, "txt": b"a red box"},
        "alpha_png": {
            "png": _encode(Image.new("RGBA", (24, 16), (0, 0, 0, 0)), "PNG"),
            "txt": b"x",
        },
        "palette_png": {"png": _encode(Image.new("P", (24, 16)), "PNG"), "txt": b"x"},
        "png16": {
            "png": _encode(Image.fromarray(np.full((16, 24), 60000, np.uint16)), "PNG"),
            "txt": b"x",
        },  # fmt: skip
        "cmyk": {"jpg": _encode(Image.new("CMYK", (24, 16)), "JPEG"), "txt": b"x"},
        "gray": {"jpg": _encode(Image.new("L", (24, 16)), "JPEG"), "txt": b"x"},
        "exif_rotated": {"jpg": _encode(rotated, "JPEG", exif=exif), "txt": b"x"},
    }
    bad = {
        "corrupt_jpeg": {"jpg": jpeg[: len(jpeg) // 3], "txt": b"x"},
        "zero_bytes": {"jpg": b"", "txt": b"x"},
        "not_an_image": {"jpg": b"hello", "txt": b"x"},
        "too_many_pixels": {"png": _encode(Image.new("L", (200, 100)), "PNG"), "txt": b"x"},
        "no_caption": {"jpg": jpeg},
        "empty_caption": {"jpg": jpeg, "txt": b"  \n"},
        "latin1_caption": {"jpg": jpeg, "txt": "caf\xe9".encode("latin-1")},
        "no_image": {"txt": b"a caption without an image"},
    }
    samples = [(f"{i:09d}_{name}", m) for i, (name, m) in enumerate({**good, **bad}.items())]
    samples.append(("000000000_good", {"jpg": jpeg, "txt": b"a duplicate key"}))
    good_keys = {key for key, _ in samples if not any(b in key for b in bad)}
    return samples, good_keys


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    samples, good_keys = _bad_and_good()
    url = write_tar(tmp_path / "00000.tar", samples)
    stream = _stream(url, max_pixels=10_000, max_skip_fraction=1.0)
    batches = [b for _, b in zip(range(len(good_keys) + 1), stream, strict=False)]
    keys = [b["__key__"][0] for b in batches]
    assert set(keys[: len(good_keys) + 1]) == good_keys  # the duplicate key is used twice
    assert keys.count("000000000_good") == 2
    assert stream.skips.by_shard == {url: 8} and stream.skips.total == 8
    by_key = {b["__key__"][0]: b["image"][0] for b in batches}
    assert by_key["000000006_exif_rotated"].shape == (3, 24, 16)  # upright: 16 wide, 24 high
    assert by_key["000000001_alpha_png"].min() == 1.0  # transparent -> white, not black
    assert by_key["000000003_png16"].min() > 0.9  # 60000/65535, not clipped to 255/255 garbage


def test_a_skip_reason_names_shard_and_key_and_no_in_memory_file(tmp_path: Path) -> None:
    jpeg = _encode(RGB, "JPEG")
    samples = [("000000000_good", {"jpg": jpeg, "txt": b"x"})]
    samples.append(("000000001_not_an_image", {"jpg": b"hello", "txt": b"x"}))
    url = write_tar(tmp_path / "00000.tar", samples)
    stream = _stream(url, max_skip_fraction=1.0, resampled=True, shards_in_flight=1)
    for _ in zip(range(3), stream, strict=False):
        pass
    assert stream.skips.reasons == {
        url: f"shard {url} sample 000000001_not_an_image: undecodable image: "
        "UnidentifiedImageError: cannot identify image file"
    }


def test_a_truncated_shard_keeps_its_good_head_and_counts_the_rest(tmp_path: Path) -> None:
    paths = write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    cut_inside_a_member(paths[1])
    stream = _stream(str(tmp_path), batch_size=1, preprocess=transforms.ToTensor())
    keys = [b["__key__"][0] for _, b in zip(range(20), stream, strict=False)]
    assert {f"{i:09d}" for i in range(10)} <= set(keys)
    assert paths[1] in stream.skips.by_shard


def test_a_bug_is_raised_not_skipped(tmp_path: Path) -> None:
    samples, _ = _bad_and_good()
    url = write_tar(tmp_path / "00000.tar", samples)

    def buggy(image: Image.Image) -> torch.Tensor:
        raise ZeroDivisionError("a bug in the transform")

    with pytest.raises(ZeroDivisionError, match="a bug"):
        next(iter(_stream(url, preprocess=buggy)))


def test_too_many_skips_stop_the_run(tmp_path: Path) -> None:
    samples, _ = _bad_and_good()  # 8 of 16 samples are bad
    url = write_tar(tmp_path / "00000.tar", samples)
    with pytest.raises(RuntimeError, match=r"samples skipped \(.*> data.max_skip_fraction=0.1\)"):
        for _ in _stream(url, max_pixels=10_000, max_skip_fraction=0.1, resampled=True):
            pass


def test_a_key_that_matches_nothing_stops_within_seconds(tmp_path: Path) -> None:
    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="50 consecutive samples or shards failed.*'caption'"):
        next(iter(_stream(str(tmp_path), source="caption", max_consecutive_errors=50, workers=1)))
    assert time.monotonic() - started < 30


def _on_call(image: Image.Image, *, call: int, act: Callable[[], object]) -> torch.Tensor:
    """A transform that runs ``act`` on its ``call``-th image (counted in the worker process)."""
    _on_call.calls = getattr(_on_call, "calls", 0) + 1  # type: ignore[attr-defined]
    if _on_call.calls == call:  # type: ignore[attr-defined]
        act()
    return transforms.functional.to_tensor(image)


def _die(after_s: float) -> None:
    time.sleep(after_s)
    os._exit(3)  # a worker killed mid-epoch (OOM killer, segfault in a codec)


def _hang(pid_file: Path) -> None:
    pid_file.write_text(str(os.getpid()))
    time.sleep(600)  # a transform or a read that never returns


@pytest.mark.parametrize("after_s", [0.0, 1.0], ids=["at-once", "after-its-batches-are-received"])
def test_a_dead_worker_is_an_error_within_seconds(tmp_path: Path, after_s: float) -> None:
    """Also when the main process has received every batch the worker sent before it died:
    then only a liveness check finds it (CI once waited out the 600 s batch timeout)."""
    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="data worker 0 of rank 0 .* exited unexpectedly"):
        for _ in _stream(
            str(tmp_path), preprocess=partial(_on_call, call=5, act=partial(_die, after_s)), workers=1,
            resampled=True, timeout=120.0,
        ):  # fmt: skip
            pass
    assert time.monotonic() - started < 30


def test_a_batch_slower_than_a_liveness_poll_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_module, "LIVENESS_POLL_S", 0.5)
    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    # the third image takes 1.5 s: longer than one liveness poll, within the batch timeout
    slow_read = partial(_on_call, call=3, act=partial(time.sleep, 1.5))
    slow = _stream(str(tmp_path), preprocess=slow_read, workers=1, timeout=60.0)
    plain = _stream(str(tmp_path), workers=1)
    keys = [b["__key__"] for b in slow]
    assert len(keys) == 20 and keys == [b["__key__"] for b in plain]


def test_a_hung_worker_is_a_batch_timeout_and_is_ended(tmp_path: Path) -> None:
    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    pid_file = tmp_path / "worker.pid"
    started = time.monotonic()
    with pytest.raises(
        BatchTimeout,
        match=r"data worker 0 of rank 0 within \d+ s "
        r"\(data.batch_timeout=2\) while reading shard .*0000[01].tar",
    ):
        for _ in _stream(
            str(tmp_path), preprocess=partial(_on_call, call=3, act=partial(_hang, pid_file)), workers=1,
            resampled=True, timeout=2.0,
        ):  # fmt: skip
            pass
    assert time.monotonic() - started < 30
    # The DataLoader's terminate() is the first SIGTERM this worker sees, which it ignores
    # (a scheduler's notice to the whole group): the stream kills it itself.
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_remote_shards_over_http_match_local_ones(tmp_path: Path) -> None:
    write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    local = _stream(f"{tmp_path}/{{00000..00001}}.tar", shuffle_buffer=5, batch_size=4)
    expected = [b["__key__"] for _, b in zip(range(4), local, strict=False)]
    with serve(tmp_path) as base:
        remote = _stream(f"{base}/{{00000..00001}}.tar", shuffle_buffer=5, batch_size=4)
        assert [b["__key__"] for _, b in zip(range(4), remote, strict=False)] == expected


def test_a_missing_remote_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    write_shards(generate_samples(10, seed=0), tmp_path, samples_per_shard=10)
    with serve(tmp_path) as base:
        stream = _stream(f"{base}/{{00000..00001}}.tar", resampled=True, max_skip_fraction=1)
        keys = [b["__key__"][0] for _, b in zip(range(12), stream, strict=False)]
    assert len(keys) == 12 and stream.skips.by_shard.get(f"{base}/00001.tar", 0) >= 1


def test_a_silent_server_is_an_error_within_seconds_naming_the_shard(tmp_path: Path) -> None:
    write_shards(generate_samples(10, seed=0), tmp_path, samples_per_shard=10)
    started = time.monotonic()
    with serve(tmp_path, stall=True) as base:
        stream = _stream(
            f"{base}/00000.tar",
            remote_timeout=1.0,
            remote_retries=1,
            workers=1,
            resampled=True,
            batch_size=10,
        )
        with pytest.raises(RemoteShardError, match=rf"shard {base}/00000.tar: no data within 1 s"):
            for _ in stream:  # several shards in flight may fill a batch before one stalls
                pass
    assert time.monotonic() - started < 20
