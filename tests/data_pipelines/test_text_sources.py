"""Text sources (phrases from objects, first clauses, fallbacks), json item fields and ``.npy``
array fields, alone and through the stream: what PyramidCLIP's text pyramid and ROI branch
read."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data_pipelines.batch_fields import ArrayField, BatchFields, ImageView, JsonField, TextField
from data_pipelines.decode import SampleError
from data_pipelines.fields import missing_batch_fields
from data_pipelines.synthetic import generate_samples
from data_pipelines.text_sources import MissingText, TextSource, first_clause, object_phrases
from data_pipelines.transforms import TrainTransform
from data_pipelines.worker_stream import _array
from data_pipelines.write import write_shards

from .test_stream_fields import _stream, _write, decode_codes, text_codes
from .test_stream_resume import _take


def test_sources_parse_and_read() -> None:
    meta = {"summary": "red star", "objects": [{"tag": "star", "attributes": ["red", "large"]}]}
    members = {"txt": "a large red star, top left; on dark."}.get
    assert TextSource.parse("txt").read(members, meta) == "a large red star, top left; on dark."
    assert TextSource.parse("json:summary").read(members, meta) == "red star"
    assert TextSource.parse("phrases:objects").read(members, meta) == "red large star"
    assert TextSource.parse("first_clause:txt").read(members, meta) == "a large red star"
    for absent in ("summary.txt", "json:abstract", "phrases:detections"):
        with pytest.raises(MissingText):
            TextSource.parse(absent).read(members, meta)
    with pytest.raises(ValueError, match="names no member|must be"):
        TextSource.parse("phrases:")


def test_object_phrases_follow_the_papers_example() -> None:
    objects = [
        {"tag": "pillow", "attributes": ["pink"]},
        {"tag": "pillow", "attributes": ["square", "pink"]},
        {"tag": "couch", "attributes": ["green"]},
        {"tag": "lamp"},
    ]
    assert object_phrases(objects) == "pink pillow, square pink pillow, green couch, lamp"
    with pytest.raises(MissingText):
        object_phrases([])
    with pytest.raises(ValueError, match="tag"):
        object_phrases([{"attributes": ["red"]}])


@pytest.mark.parametrize(
    "text, clause",
    [
        ("a small blue circle, bottom right, on dark", "a small blue circle"),
        ("There is a 1.5 cm nodule; stable.", "There is a 1.5 cm nodule"),
        ("no clause end at all", "no clause end at all"),
        ("A red star. Top left.", "A red star"),
    ],
)
def test_first_clause(text: str, clause: str) -> None:
    assert first_clause(text) == clause


def _meta(index: int) -> dict[str, Any]:
    """Every third sample lacks a summary; sample i has i % 3 objects."""
    objects = [
        {"box": [0.1 * j, 0.2, 0.1 * j + 0.3, 0.9], "tag": "star", "attributes": [f"c{j}"]}
        for j in range(index % 3)
    ]
    meta: dict[str, Any] = {"objects": objects, "index": index}
    if index % 3:
        meta["summary"] = f"summary {index}"
    return meta


def _fields() -> BatchFields:
    view = ImageView("image", TrainTransform((16, 16), scale=(0.9, 1.0)))
    summary = TextField(
        "summary", text_codes, "json:summary", fallback="first_clause:txt", tokenizer_name="c"
    )
    return BatchFields(
        views=(view,),
        texts=(summary, TextField("caption", text_codes, "txt", tokenizer_name="c")),
        json=(JsonField("boxes", "objects", item="box"), JsonField("index", "index")),
    )


def test_the_stream_carries_fallback_flags_and_item_fields(tmp_path: Path) -> None:
    urls = _write(tmp_path / "shards", n=24, meta=_meta)
    fields = _fields()
    assert "summary_fallback" in fields.batch_keys()
    batches = _take(_stream(urls, fields, batch_size=6), 4)
    for batch in batches:
        for row, index in enumerate(batch["index"].tolist()):
            summary = decode_codes(batch["summary"][row])
            caption = decode_codes(batch["caption"][row])
            fell_back = bool(batch["summary_fallback"][row])
            assert fell_back == (index % 3 == 0)
            assert summary == (first_clause(caption) if fell_back else f"summary {index}")
            boxes = _meta(index)["objects"]
            assert int(batch["boxes_mask"][row].sum()) == len(boxes)
            for j, obj in enumerate(boxes):
                torch.testing.assert_close(batch["boxes"][row, j], torch.tensor(obj["box"]))


def test_a_fallback_changes_the_fingerprint_and_plain_fields_keep_theirs() -> None:
    plain = TextField("summary", text_codes, "json:summary")
    assert plain.fingerprint()[-1] != "first_clause:txt" and len(plain.fingerprint()) == 7
    with_fallback = TextField("summary", text_codes, "json:summary", fallback="first_clause:txt")
    assert with_fallback.fingerprint() == (*plain.fingerprint(), "first_clause:txt")
    assert JsonField("b", "boxes").fingerprint() == ("json", "b", "boxes")
    assert JsonField("b", "objects", "box").fingerprint() == ("json", "b", "objects", "box")


def test_startup_check_accepts_a_fallback_and_names_both_when_neither_is_there(
    tmp_path: Path,
) -> None:
    urls = _write(tmp_path / "shards", n=8, meta=lambda index: {"objects": [], "index": index})
    assert missing_batch_fields([f"{urls}/00000.tar"], _fields()) == []  # the caption is there
    summary = TextField("summary", text_codes, "json:summary", fallback="json:abstract")
    fields = BatchFields(views=_fields().views, texts=(summary,))
    (missing,) = missing_batch_fields([f"{urls}/00000.tar"], fields)
    assert str(missing).startswith(
        "field 'summary' (json key 'summary' or json key 'abstract') is missing"
    )


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npy_members_collate_padded_with_a_mask(tmp_path: Path) -> None:
    samples = []
    for index, sample in enumerate(generate_samples(12, seed=0)):
        regions = np.full((index % 3, 5), float(index), np.float32)
        samples.append({**sample, "json": {"index": index}, "regions.npy": _npy(regions)})
    write_shards(samples, tmp_path / "shards", samples_per_shard=4)
    fields = BatchFields(
        views=_fields().views,
        json=(JsonField("index", "index"),),
        arrays=(ArrayField("regions", "regions.npy"),),
    )
    assert ("array", "regions", "regions.npy") in fields.fingerprint_parts()
    for batch in _take(_stream(str(tmp_path / "shards"), fields, batch_size=4), 3):
        assert batch["regions"].shape[-1] == 5 or batch["regions"].shape[1] == 0
        for row, index in enumerate(batch["index"].tolist()):
            n = index % 3
            assert batch["regions_mask"][row].tolist() == [True] * n + [False] * (
                batch["regions_mask"].shape[1] - n
            )
            assert (batch["regions"][row, :n] == index).all() and (
                batch["regions"][row, n:] == 0
            ).all()


@pytest.mark.parametrize(
    "data, match",
    [
        (_npy(np.array([{"a": 1}], dtype=object)), "not a .npy array of numbers"),
        (_npy(np.zeros(4)), r"shape \(4,\), not \[n, d\]"),
        (b"not an array", "not a .npy array of numbers"),
    ],
)
def test_bad_npy_members_are_sample_errors_naming_the_member(data: bytes, match: str) -> None:
    with pytest.raises(SampleError, match=match):
        _array(data, "regions.npy")
