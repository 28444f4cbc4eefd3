"""Where a data worker's time goes, per sample: the stages of one worker's loop, timed apart.

``data_throughput.py --profile`` runs this on its shards: the worker's own loop
(``worker_stream.worker_batches``, in this process) in CPU time per sample, next to each of its
stages on the same samples: reading the tar members (``tario.iter_samples``, and Python's
``tarfile`` as a reference, on the shards as written with a pax header per member and on
ustar copies without), decoding, seed derivation, drawing the crop box, crop+resize,
collating (stacking and tokenising), and the batch's trip between processes (torch's
``ForkingPickler`` dump and load, which moves the tensors through shared memory, as the
DataLoader's queue does). What the stages leave of the loop is the shuffle buffer, the
bookkeeping and the per-sample dicts. The whole loop runs with ``tario`` and with ``tarfile``
swapped in (the loop before ``tario``), in rounds interleaved with decode-only (one process
decoding the same JPEGs: the per-worker bar), so load drift hits all alike. Last, the same loop
in a real DataLoader worker process (its CPU time from the OS once it has exited; two runs of
different lengths, differenced, so start-up and prefetching cancel): the in-process loop plus
the worker's side of the queue. CPU time of this thread (process time for the pickling, whose
shared-memory hand-over uses a helper thread; the worker's own rusage), so the machine's other
load moves it less than wall time (not to nothing: on 2 busy cores a stage reads up to ~1.5x
its idle cost from one run to the next).
"""

from __future__ import annotations

import gc
import io
import resource
import tarfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions ForkingPickler uses)
import webdataset as wds
from PIL import Image

from data_pipelines import shard_reader
from data_pipelines.batch_fields import BatchFields
from data_pipelines.decode import decode_caption, decode_for_transforms, decode_image
from data_pipelines.stream import make_train_stream
from data_pipelines.stream_plan import derive_seed
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.tario import RawSample, _split, _tarfile_members, group_samples, iter_samples
from data_pipelines.transforms import FastTransforms
from data_pipelines.worker_stream import _collate, worker_batches

Tokenizer = Callable[[list[str]], torch.Tensor]


def tarfile_samples(stream: Any, url: str) -> Iterator[RawSample]:
    """Samples read by Python's ``tarfile`` (``r|*``): the reader ``tario`` replaced (its
    members grouped into samples as ``tario`` groups them)."""
    return group_samples(_tarfile_members(stream, _split, read=True), url)


def ustar_copies(folder: Path, shards: list[Path]) -> list[Path]:
    """Copies of ``shards`` under ``folder/ustar`` with plain ustar headers (an int mtime, as
    ``vlp shards write`` writes now), made once."""
    out = folder / "ustar"
    out.mkdir(exist_ok=True)
    copies = []
    for shard in shards:
        copy = out / shard.name
        if not copy.exists():
            buffer = io.BytesIO()
            with tarfile.open(shard) as src, tarfile.open(fileobj=buffer, mode="w") as dst:
                for info in src:
                    info.mtime, info.pax_headers = int(info.mtime), {}
                    dst.addfile(info, src.extractfile(info))
            copy.write_bytes(buffer.getvalue())
        copies.append(copy)
    return copies


def _cpu_ms(
    fn: Callable[[], Any], per: int, clock: Callable[[], float] = time.thread_time
) -> float:
    """Milliseconds of CPU time ``fn()`` takes, divided by ``per``; the best of 3 runs (the
    least disturbed by other load)."""
    runs = []
    for _ in range(3):
        started = clock()
        fn()
        runs.append((clock() - started) * 1000 / per)
    return min(runs)


def _read_all(read: Callable[[Any, str], Iterator[RawSample]], shards: list[Path]) -> int:
    count = 0
    for shard in shards:
        with wds.gopen(str(shard)) as stream:
            count += sum(1 for _ in read(stream, str(shard)))
    return count


def _read_rows(shards: list[Path], copies: list[Path]) -> list[dict[str, Any]]:
    with tarfile.open(shards[0]) as tar:
        per_sample = len(tar.getmembers()) / sum(1 for _ in iter_samples(open(shards[0], "rb"), ""))
    rows = []
    for label, files in (
        ("pax header per member (as written until now)", shards),
        ("ustar, no pax (as written now)", copies),
    ):
        for reader, read in (
            ("tario.iter_samples", iter_samples),
            ("tarfile r|*", tarfile_samples),
        ):
            n = _read_all(read, files)
            ms = _cpu_ms(lambda read=read, files=files: _read_all(read, files), n)
            rows.append(
                {
                    "stage": f"read: {reader}, {label}",
                    "ms": ms,
                    "us_per_member": ms * 1000 / per_sample,
                }
            )
    return rows


def _loop(folder: Path, fast: FastTransforms, tokenizer: Tokenizer) -> Iterator[Any]:
    """One worker's whole loop on ``folder``'s shards, in this process, past its first batches."""
    settings = StreamSettings(batch_size=64, workers=1, resampled=True, draft_size=fast.draft_size)
    fields = BatchFields.single(fast.train, tokenizer)
    stream = make_train_stream(f"{folder}/{{00000..00007}}.tar", settings, fields=fields)
    loop = worker_batches(stream.spec, stream.spec.stream_at(0), None, fields)
    for _ in range(2):  # fill the shuffle buffer's first stretch before timing
        next(loop)
    return loop


def _loop_rounds(
    folder: Path, fast: FastTransforms, tokenizer: Tokenizer, jpegs: list[bytes], batches: int
) -> dict[str, float]:
    """CPU ms per sample, the best of 3 interleaved rounds (so load drift hits each alike):
    decode-only, and the in-process loop on the pax and ustar shards, each read by ``tario``
    and by ``tarfile`` (``shard_reader``'s reader swapped: the loop before ``tario``)."""
    loops = {}
    for label, where in (("pax", folder), ("ustar", folder / "ustar")):
        loops[f"{label}, tario"] = _loop(where, fast, tokenizer)
        with patch.object(shard_reader, "iter_samples", tarfile_samples):
            loops[f"{label}, tarfile"] = _loop(where, fast, tokenizer)
    best: dict[str, float] = {}

    def keep(name: str, ms: float) -> None:
        best[name] = min(ms, best.get(name, ms))

    for _ in range(3):
        keep(
            "decode-only",
            _cpu_ms(lambda: [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs], len(jpegs)),
        )
        for name, loop in loops.items():
            with patch.object(
                shard_reader, "iter_samples", tarfile_samples if "tarfile" in name else iter_samples
            ):
                keep(
                    name,
                    _cpu_ms(lambda loop=loop: [next(loop) for _ in range(batches)], batches * 64),
                )
    return best


def _dataloader_worker_ms(
    folder: Path, fast: FastTransforms, tokenizer: Tokenizer, batches: int
) -> tuple[float, float]:
    """CPU ms and minor page faults per sample of one DataLoader worker process running the
    stream on ``folder``."""

    def worker_cpu_s(n: int) -> tuple[float, int]:
        settings = StreamSettings(
            batch_size=64, workers=1, resampled=True, draft_size=fast.draft_size
        )
        fields = BatchFields.single(fast.train, tokenizer)
        stream = make_train_stream(f"{folder}/{{00000..00007}}.tar", settings, fields=fields)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        loop = iter(stream)
        for _ in range(n):
            next(loop)
        loop.close()  # type: ignore[attr-defined]  # joins the worker: its rusage is counted
        del loop
        gc.collect()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return cpu, after.ru_minflt - before.ru_minflt

    short = min(worker_cpu_s(4) for _ in range(2))
    long = min(worker_cpu_s(4 + batches) for _ in range(2))
    return (long[0] - short[0]) * 1000 / (batches * 64), (long[1] - short[1]) / (batches * 64)


def worker_profile(
    folder: Path, fast: FastTransforms, tokenizer: Tokenizer, batches: int = 8
) -> list[dict[str, Any]]:
    """Rows ``{"stage", "ms"}`` (CPU ms per sample) for the shards in ``folder``."""
    shards = sorted(folder.glob("0000[0-7].tar"))
    copies = ustar_copies(folder, shards)
    raws = list(iter_samples(open(shards[0], "rb"), str(shards[0])))
    jpegs, texts = [r.members["jpg"] for r in raws], [r.members["txt"] for r in raws]
    images = [decode_for_transforms(j, draft_size=fast.draft_size) for j in jpegs]
    n = len(raws)

    def box_and_seed(seeding: bool) -> None:
        for i, image in enumerate(images):
            if seeding:
                torch.default_generator.manual_seed(derive_seed(0, 0, 0, i, 17))
                derive_seed(0, 0, 0, i, 13)  # the shuffle buffer's slot
            else:
                fast.train.crop_box(image)

    fields = BatchFields.single(fast.train, tokenizer)
    samples = [
        {"__key__": r.key, "image": fast.train(im), "text": decode_caption(t)}
        for r, im, t in zip(raws, images, texts, strict=True)
    ]
    batch = _collate(samples, fields, ())
    captions = [s["text"] for s in samples]
    transform = _cpu_ms(lambda: [fast.train(im) for im in images], n)
    box = _cpu_ms(lambda: box_and_seed(False), n)
    collate = _cpu_ms(lambda: _collate(samples, fields, ()), n)
    tokenise = _cpu_ms(lambda: tokenizer(captions), n)
    ipc = _cpu_ms(
        lambda: ForkingPickler.loads(ForkingPickler.dumps(batch)), n, clock=time.process_time
    )
    rows = _read_rows(shards, copies) + [
        {
            "stage": "decode (draft), into an array (decode_for_transforms)",
            "ms": _cpu_ms(
                lambda: [decode_for_transforms(j, draft_size=fast.draft_size) for j in jpegs], n
            ),
        },
        {
            "stage": "seeds: 2 derive_seed + generator.manual_seed",
            "ms": _cpu_ms(lambda: box_and_seed(True), n),
        },
        {"stage": "crop box (RandomResizedCrop.get_params)", "ms": box},
        {"stage": "crop+resize (TrainTransform minus its box)", "ms": transform - box},
        {"stage": "caption decode", "ms": _cpu_ms(lambda: [decode_caption(t) for t in texts], n)},
        {"stage": "collate: stack + keys (batch of 64)", "ms": collate - tokenise},
        {"stage": "tokenise (one call per batch)", "ms": tokenise},
        {"stage": "IPC: ForkingPickler dump + load of a batch (process time)", "ms": ipc},
    ]
    stages = sum(r["ms"] for r in rows[4:-1])  # decode .. tokenise: not the reads, not IPC
    rows.append(
        {
            "stage": "for reference: Pillow's decode of the same (decode_image, draft)",
            "ms": _cpu_ms(lambda: [decode_image(j, draft_size=fast.draft_size) for j in jpegs], n),
        }
    )
    loops = _loop_rounds(folder, fast, tokenizer, jpegs, batches)
    for label, read in (("pax", rows[0]["ms"]), ("ustar", rows[2]["ms"])):
        rows += [
            {
                "stage": f"whole worker loop, {label} shards, tarfile (before)",
                "ms": loops[f"{label}, tarfile"],
            },
            {"stage": f"whole worker loop, {label} shards, tario", "ms": loops[f"{label}, tario"]},
            {
                "stage": f"  rest: shuffle buffer, bookkeeping, dicts ({label})",
                "ms": loops[f"{label}, tario"] - stages - read,
            },
        ]
    for label, where in (("pax", folder), ("ustar", folder / "ustar")):
        ms, faults = _dataloader_worker_ms(where, fast, tokenizer, 2 * batches)
        rows.append(
            {
                "stage": f"DataLoader worker process, {label} shards (its CPU time)",
                "ms": ms,
                "minor_faults": faults,
            }
        )
    decode_only = loops["decode-only"]
    rows.append(
        {"stage": "decode-only: full decode, Image.open().convert('RGB')", "ms": decode_only}
    )
    for row in [
        r for r in rows if r["stage"].startswith(("whole worker loop", "DataLoader worker"))
    ]:
        rows.append({"stage": f"decode-only / ({row['stage']})", "ratio": decode_only / row["ms"]})
    return rows
