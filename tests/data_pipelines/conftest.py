"""Tiny img2dataset-shaped shards written into tmp dirs, shared by the data_pipelines tests."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision import transforms

from data_pipelines.batch_fields import BatchFields
from data_pipelines.shards import Urls
from data_pipelines.stream import TrainStream, make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

CTX = 8


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """Deterministic stand-in for a BPE tokenizer: character codes, padded to CTX."""
    out = torch.zeros(len(texts), CTX, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [ord(c) for c in t[:CTX]]
        out[i, : len(codes)] = torch.tensor(codes)
    return out


def preprocess() -> transforms.Compose:
    """A minimal image transform: resize to 32 px and convert to a float tensor."""
    return transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


def make_stream(
    urls: Urls,
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] = fake_tokenizer,
    *,
    source: str = "txt",
    fields: BatchFields | None = None,
    rank: int = 0,
    world_size: int = 1,
    **settings: Any,
) -> TrainStream:
    """``make_train_stream`` with ``StreamSettings``' fields given as keywords; without
    ``fields``, one image view ``preprocess`` and one caption from ``source``."""
    if fields is None:
        assert preprocess is not None, "make_stream needs preprocess or fields"
        fields = BatchFields.single(preprocess, tokenizer, source)
    return make_train_stream(
        urls, StreamSettings(**settings), fields=fields, rank=rank, world_size=world_size
    )


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A shard written member by member (bad bytes included), in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def cut_inside_a_member(path: str | Path) -> None:
    """Truncate the tar at ``path`` in the middle of the data of the first member that starts
    past the file's middle: a cut the stream must notice, wherever the members happen to fall
    (a cut at a member boundary ends a tar quietly, as for ``tarfile``)."""
    data = Path(path).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar.getmembers() if m.offset_data >= len(data) // 2 and m.size > 1)
    Path(path).write_bytes(data[: member.offset_data + member.size // 2])


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six shards of unequal size (7, 7, 7, 7, 7, 5 samples), keys 000000000..000000039."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(generate_samples(40, seed=0), out, samples_per_shard=7)
    return str(out)
