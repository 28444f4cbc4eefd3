"""Sidecars (data_pipelines/sidecar.py): sorted keys and one value array, memory-mapped; a
lookup is a binary search (no per-key list, no per-sample open) at 10^6 keys; a key the file
lacks is a counted skip; old one-tensor-per-key files are refused with the command that
converts them, and converted keep their resume fingerprint."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipelines import sidecar as sidecar_module
from data_pipelines.batch_fields import BatchFields, ImageView, SidecarField
from data_pipelines.decode import SampleError
from data_pipelines.sidecar import (
    DuplicateKeyError,
    Sidecar,
    SidecarFormatError,
    SidecarWriter,
    open_sidecar,
    sidecar_metadata,
    write_sidecar,
)

from .conftest import make_stream, preprocess


def _no_safetensors_reader(*args, **kwargs):
    raise AssertionError("a lookup must not open the file with safetensors (it lists every key)")


def test_a_million_keys_are_found_by_binary_search_without_a_per_key_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 1_000_000
    rng = np.random.default_rng(0)
    keys = [f"{i:09d}" for i in range(n)]
    values = torch.from_numpy(rng.standard_normal((n, 4)).astype(np.float32))
    path = tmp_path / "big.safetensors"
    order = rng.permutation(n)  # written in any order, in chunks
    with SidecarWriter(path, {"id": "big"}) as writer:
        for start in range(0, n, 250_000):
            chunk = order[start : start + 250_000]
            writer.add([keys[i] for i in chunk], values[chunk])
    assert sidecar_metadata(path)["id"] == "big"
    monkeypatch.setattr(safetensors, "safe_open", _no_safetensors_reader)
    headers = []
    monkeypatch.setattr(sidecar_module, "read_header", _spy(sidecar_module.read_header, headers))
    open_sidecar.cache_clear()
    field = SidecarField("lp", str(path))
    for i in rng.integers(0, n, 2000):
        assert torch.equal(field.lookup(keys[i]), values[i])
    for absent in ("000000000x", "1000000000", "", "0" * 40):
        with pytest.raises(SampleError, match="is not in sidecar"):
            field.lookup(absent)
    assert len(headers) == 1  # the header is parsed once per process, not per sample
    open_sidecar.cache_clear()


def _spy(function, calls: list):
    def spy(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return spy


def _random_keys(rng: random.Random, count: int) -> list[str]:
    alphabet = "ab0_é猫"
    keys = {"".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(count)}
    return sorted(keys, key=lambda _: rng.random())


@pytest.mark.parametrize("count", [0, 1, 2, 7, 300])
@pytest.mark.parametrize("seed", range(4))
def test_every_key_and_no_other_is_found_whatever_the_keys(tmp_path, count, seed) -> None:
    """Keys of mixed lengths and utf-8 widths, prefixes of each other, in random order."""
    rng = random.Random(seed)
    keys = _random_keys(rng, count)
    rows = {key: torch.randn(2, 3, generator=torch.Generator().manual_seed(i))
            for i, key in enumerate(keys)}  # fmt: skip
    path = tmp_path / "s.safetensors"
    assert write_sidecar(path, rows, shards={"/data/00000.tar": len(keys)}) == len(keys)
    sidecar = Sidecar(path)
    assert len(sidecar) == len(keys) and [k for k, _ in sidecar.items()] == sorted(
        keys, key=str.encode
    )
    for key, value in rows.items():
        assert key in sidecar and torch.equal(sidecar.get(key), value)
    others = [k for k in _random_keys(rng, 50) if k not in rows] + ["猫" * 30, "a\n"]
    assert not any(k in sidecar for k in others)
    mixed = others + keys
    assert sidecar.contains(mixed).tolist() == [k in rows for k in mixed]
    assert sidecar.shards() == {"/data/00000.tar": len(keys)}


def test_the_file_is_plain_safetensors(tmp_path) -> None:
    path = tmp_path / "s.safetensors"
    write_sidecar(path, {"b": torch.ones(3), "a": torch.zeros(3)}, {"id": "x"}, {"s.tar": 2})
    with safe_open(str(path), "pt") as handle:
        assert handle.get_tensor("values").tolist() == [[0.0] * 3, [1.0] * 3]
        assert bytes(handle.get_tensor("keys").flatten().tolist()) == b"ab"
        assert handle.metadata()["id"] == "x" and handle.metadata()["vlp_sidecar"] == "2"


def test_a_key_given_twice_is_refused_and_nothing_is_left(tmp_path) -> None:
    path = tmp_path / "s.safetensors"
    with pytest.raises(DuplicateKeyError, match="'k2' appears twice") as error:
        with SidecarWriter(path) as writer:
            writer.add(["k1", "k2"], torch.zeros(2, 1))
            writer.add(["k2"], torch.zeros(1, 1))
    assert error.value.key == "k2" and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="rows of shape"), SidecarWriter(path) as writer:
        writer.add(["a"], torch.zeros(1, 2))
        writer.add(["b"], torch.zeros(1, 3))
    assert list(tmp_path.iterdir()) == []


def test_a_key_the_file_lacks_is_skipped_and_counted(shard_dir, tmp_path) -> None:
    """shard_dir: 40 samples 000000000..000000039 in shards of 7; the sidecar lacks 4 of them,
    none the last of its shard (a skip is counted with the next batch of its worker)."""
    kept = [f"{i:09d}" for i in range(40) if i not in (3, 11, 19, 35)]
    path = tmp_path / "s.safetensors"
    write_sidecar(path, {key: torch.full((2,), float(key)) for key in kept})
    fields = BatchFields(views=(ImageView("image", preprocess()),),
                         sidecars=(SidecarField("lp", str(path)),))  # fmt: skip
    stream = make_stream(shard_dir, fields=fields, batch_size=4, resampled=False,
                         shuffle_buffer=1, max_skip_fraction=1.0)  # fmt: skip
    batches = [b for _, b in zip(range(9), stream, strict=False)]
    seen = [key for b in batches for key in b["__key__"]]
    assert sorted(seen) == kept
    for batch in batches:
        assert batch["lp"].tolist() == [[float(k)] * 2 for k in batch["__key__"]]
    assert stream.skips.total == 4 and stream.skips.ok == 36


def test_an_old_sidecar_is_refused_and_converted_in_place_with_the_same_fingerprint(
    tmp_path, capsys
) -> None:
    from launch.cli import main

    old = tmp_path / "old.safetensors"
    rows = {f"{i:09d}": torch.randn(3) for i in range(20)}
    save_file(rows, str(old), metadata={"id": "run-1"})
    fingerprint = ("sidecar", "lp", str(old), str(os.path.getsize(old)), "run-1")  # as before
    command = f"vlp shards convert-sidecar {old}"
    with pytest.raises(
        SidecarFormatError, match=f"old format .*; convert it in place with: {command}$"
    ):
        Sidecar(old)
    assert main(command.split()[1:]) == 0
    assert "wrote 20 rows" in capsys.readouterr().out
    converted = Sidecar(old)
    assert dict(converted.items()).keys() == rows.keys()
    assert all(torch.equal(converted.get(k), v) for k, v in rows.items())
    assert SidecarField("lp", str(old)).fingerprint() == fingerprint  # a run resumes on it
    assert main(command.split()[1:]) == 2
    assert "already in format version 2" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]
