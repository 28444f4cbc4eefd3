"""The training stream: shapes, determinism, rank splitting, epoch accounting, skipped samples."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipelines.stream import count_samples, expand_urls
from data_pipelines.synthetic import generate_samples
from data_pipelines.write import write_shards

from .conftest import CTX, cut_inside_a_member, make_stream, preprocess, write_tar


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _stream(urls: str | list[str], **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 10)
    return make_stream(urls, preprocess(), **kw)


def _keys(batches) -> list[list[str]]:  # type: ignore[no-untyped-def]
    return [b["__key__"] for b in batches]


def test_expand_urls_brace_list_and_directory(shard_dir: str) -> None:
    braced = expand_urls(f"{shard_dir}/{{00000..00005}}.tar")
    assert [os.path.basename(u) for u in braced] == [f"{i:05d}.tar" for i in range(6)]
    assert expand_urls(shard_dir) == braced
    assert expand_urls(Path(shard_dir)) == braced
    assert expand_urls(braced[:2]) == braced[:2]
    assert expand_urls(f"file://{shard_dir}") == braced


def test_missing_or_empty_raise_file_not_found(shard_dir: str, tmp_path: Path) -> None:
    pattern = f"{shard_dir}/{{00000..00009}}.tar"
    with pytest.raises(FileNotFoundError, match="00009"):
        expand_urls(pattern)
    with pytest.raises(FileNotFoundError, match="nope"):
        _stream(str(tmp_path / "nope.tar"))
    with pytest.raises(FileNotFoundError, match="no shards"):
        _stream(str(tmp_path))  # an empty directory


def test_count_samples_with_and_without_sizes_json(shard_dir: str, tmp_path: Path) -> None:
    assert count_samples(shard_dir) == 40
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    os.remove(copy / "sizes.json")
    assert count_samples(str(copy)) == 40


def test_batch_shapes_and_dtypes(shard_dir: str) -> None:
    batch = next(iter(_stream(shard_dir, extra_keys=("cls", "json"))))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, CTX) and batch["text"].dtype == torch.long
    assert len(batch["__key__"]) == 4 and all(len(k) == 9 for k in batch["__key__"])
    assert batch["cls"].dtype == torch.long and batch["cls"].shape == (4,)
    assert [m["key"] for m in batch["json"]] == batch["__key__"]


def test_open_clip_tokenizer_works_offline(shard_dir: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    loader = make_stream(shard_dir, preprocess(), open_clip.get_tokenizer("ViT-B-32"), batch_size=2)
    batch = next(iter(loader))
    assert batch["text"].shape == (2, 77) and batch["text"].dtype == torch.long


def test_resampled_is_deterministic_and_rank_dependent(shard_dir: str) -> None:
    first = _keys(islice(_stream(shard_dir, seed=1), 6))
    assert first == _keys(islice(_stream(shard_dir, seed=1), 6))
    a, b = next(iter(_stream(shard_dir, seed=1))), next(iter(_stream(shard_dir, seed=1)))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert first != _keys(islice(_stream(shard_dir, seed=2), 6))
    rank1 = _keys(islice(_stream(shard_dir, seed=1, rank=1, world_size=2), 6))
    assert first != rank1
    assert len(list(islice(_stream(shard_dir), 30))) == 30, "resampled streams are infinite"


# Shard-size mixes for the epoch-mode property: equal, one short shard, alternating, one shard
# holding most of the data, and uneven sizes that no batch size divides.
SHARD_SIZE_MIXES = [
    (7, 7, 7, 7, 7, 5),
    (6, 6, 6, 6),
    (10, 2, 10, 2, 10, 2),
    (3, 3, 3, 3, 3, 25),
    (1, 9, 4, 12, 3, 6, 8, 5),
]
SEEDS = range(8)


def _shards_of_sizes(root: Path, sizes: tuple[int, ...]) -> str:
    root.mkdir()
    image, key = _jpeg(), 0
    for index, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append((f"{key:09d}", {"jpg": image, "txt": b"a shape"}))
            key += 1
        write_tar(root / f"{index:05d}.tar", samples)
    return str(root)


def _epoch_violations(urls: str, seed: int, world_size: int) -> list[str]:
    """What breaks the epoch contract for one (shards, seed, world size): every rank yields the
    same number of full batches, no sample twice in a rank's epoch, none shared by two ranks."""
    found, per_rank = [], []
    for rank in range(world_size):
        loader = _stream(urls, resampled=False, rank=rank, world_size=world_size, seed=seed)
        keys = [k for b in loader for k in b["__key__"]]
        if len(keys) != 4 * len(loader):
            found.append(f"rank {rank} yielded {len(keys)} samples, len() says {4 * len(loader)}")
        if len(set(keys)) != len(keys):
            found.append(f"rank {rank} repeats {len(keys) - len(set(keys))} samples")
        per_rank.append(set(keys))
    for a in range(world_size):
        for b in range(a + 1, world_size):
            if shared := per_rank[a] & per_rank[b]:
                found.append(f"ranks {a} and {b} share {len(shared)} samples")
    return found


def test_epoch_mode_is_disjoint_and_equal_length_for_every_seed_and_shard_mix(
    tmp_path: Path,
) -> None:
    violations = []
    for index, sizes in enumerate(SHARD_SIZE_MIXES):
        urls = _shards_of_sizes(tmp_path / f"mix{index}", sizes)
        for seed in SEEDS:
            for world_size in (2, 3):
                for problem in _epoch_violations(urls, seed, world_size):
                    violations.append(f"shards {sizes}, seed {seed}, {world_size} ranks: {problem}")
    assert not violations, "\n".join(violations)


def test_epoch_mode_reshuffles_per_epoch_and_is_deterministic(shard_dir: str) -> None:
    def run(epoch: int) -> list[list[str]]:
        return _keys(_stream(shard_dir, resampled=False, seed=3, epoch=epoch))

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_epoch_mode_with_two_workers(shard_dir: str) -> None:
    def run() -> list[list[str]]:
        loader = _stream(shard_dir, resampled=False, workers=2, rank=1, world_size=2)
        batches = _keys(loader)
        # 6 shards (7 x 5 + 5 samples) on 2 ranks x 2 workers: the least-loaded worker holds
        # one shard, 1 batch of 4, so every worker yields 1 batch and a rank 2.
        assert len(batches) == len(loader) == 2
        return batches

    assert run() == run()


def test_too_few_shards_for_ranks_and_workers(shard_dir: str) -> None:
    with pytest.raises(ValueError, match=r"4 x 1 x 2 = 8\), but the stream has 6.*resampled=True"):
        _stream(shard_dir, resampled=False, world_size=4, workers=2)
    _stream(shard_dir, resampled=True, world_size=4, workers=2)  # fine when resampling


def test_corrupt_image_is_skipped_and_counted(tmp_path: Path) -> None:
    samples = [(f"{i:09d}", {"jpg": _jpeg(), "txt": b"a star"}) for i in range(8)]
    samples[3][1]["jpg"] = b"this is not a jpeg"
    url = write_tar(tmp_path / "00000.tar", samples)
    loader = _stream(url, resampled=False, batch_size=1, shuffle_buffer=1)
    keys = [k for b in loader for k in b["__key__"]]  # 7 good samples, then the next epoch's
    assert keys[:7] == [key for key, _ in samples if key != "000000003"]
    assert loader.skips.total == 1 and loader.skips.ok == 8
    assert list(loader.skips.by_shard) == [url]


def test_truncated_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    paths = write_shards(generate_samples(20, seed=0), tmp_path, samples_per_shard=10)
    cut_inside_a_member(paths[1])
    # a cut through a sample and a tar header can cost 2 of 20 samples: over the default 10 %
    loader = _stream(str(tmp_path), resampled=False, batch_size=1, max_skip_fraction=0.5)
    keys = [k for b in loader for k in b["__key__"]]
    assert {f"{i:09d}" for i in range(10)} <= set(keys)
    assert loader.skips.total >= 1 and paths[1] in loader.skips.by_shard


def test_all_corrupt_stops_instead_of_spinning(tmp_path: Path) -> None:
    url = write_tar(tmp_path / "00000.tar", [(f"{i:09d}", {"jpg": b"x", "txt": b"a"}) for i in range(10)])  # fmt: skip
    with pytest.raises(RuntimeError, match="200 consecutive samples or shards failed.*00000.tar"):
        next(iter(_stream(url)))


def test_resampled_with_two_workers_is_deterministic(shard_dir: str) -> None:
    def run() -> list[list[str]]:
        return _keys(islice(_stream(shard_dir, workers=2, seed=5), 4))

    first = run()
    assert first == run()
    assert first[0] != first[1], "the two workers draw different shards and samples"


def test_len_and_pickling(shard_dir: str) -> None:
    resampled = _stream(shard_dir)
    with pytest.raises(TypeError, match="infinite"):
        len(resampled)
    # Picklable pipelines work with the "spawn" start method (macOS, Windows).
    pickle.dumps(resampled.dataset)
    pickle.dumps(_stream(shard_dir, resampled=False).dataset)


def test_bad_arguments(shard_dir: str) -> None:
    with pytest.raises(ValueError, match="rank"):
        _stream(shard_dir, rank=2, world_size=2)
    with pytest.raises(ValueError, match="clash"):
        _stream(shard_dir, extra_keys=("text",))
    with pytest.raises(ValueError, match="less than one batch"):
        _stream(shard_dir, resampled=False, batch_size=8, world_size=2, workers=3)


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """9 shards of 100 samples, shard i holding class i only (a class folder written in order)."""
    root, image = tmp_path_factory.mktemp("class_sorted"), _jpeg()
    for cls in range(9):
        samples = [(f"{cls:02d}{i:07d}", {"jpg": image, "txt": b"a", "cls": b"%d" % cls}) for i in range(100)]  # fmt: skip
        write_tar(root / f"{cls:05d}.tar", samples)
    return str(root)


@pytest.mark.parametrize("resampled", [False, True])
def test_batches_mix_classes_of_class_sorted_shards(class_sorted: str, resampled: bool) -> None:
    """A shuffle buffer the size of a shard mixes one shard; several shards in flight mix."""

    def classes(**kw) -> list[int]:  # type: ignore[no-untyped-def]
        loader = _stream(class_sorted, batch_size=32, shuffle_buffer=100, extra_keys=("cls",),
                         resampled=resampled, seed=1, **kw)  # fmt: skip
        return [len(set(b["cls"].tolist())) for b in islice(loader, 8)]

    assert min(classes()) >= 5, "the default reads enough shards at once"
    assert min(classes(shards_in_flight=1)) <= 2, "one shard at a time: one or two classes"
