"""Tiny img2dataset-shaped shards written into tmp dirs, shared by the data_pipelines tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from torchvision import transforms

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


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A shard written member by member (bad bytes included), in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six shards of unequal size (7, 7, 7, 7, 7, 5 samples), keys 000000000..000000039."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(generate_samples(40, seed=0), out, samples_per_shard=7)
    return str(out)
