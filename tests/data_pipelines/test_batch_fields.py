"""BatchFields: validation, clashing keys, what the stream reads, fingerprints, JSON collate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from data_pipelines.batch_fields import (
    BatchFields,
    ImageView,
    JsonField,
    TextField,
    collate_json,
)
from data_pipelines.decode import SampleError
from data_pipelines.sentences import SPLITTER

from .conftest import fake_tokenizer, preprocess


def _fields(**kw: Any) -> BatchFields:
    kw.setdefault("views", (ImageView("global", preprocess()), ImageView("local", preprocess())))
    kw.setdefault(
        "texts",
        (
            TextField("caption", fake_tokenizer),
            TextField("report", fake_tokenizer, source="json:report", choose="sentence",
                      min_words=3, tokenizer_name="minilm"),
        ),
    )  # fmt: skip
    kw.setdefault("json", (JsonField("boxes", "boxes"),))
    return BatchFields(**kw)


def test_batch_keys_and_what_the_stream_reads() -> None:
    fields = _fields(json=(JsonField("boxes", "boxes"), JsonField("tags", "tags")))
    assert fields.batch_keys() == (
        "__key__", "global", "local", "caption", "report", "boxes", "tags", "boxes_mask",
        "tags_mask",
    )  # fmt: skip
    assert fields.required_members() == {"txt", "json"}
    assert fields.required_json_keys() == {"report", "boxes", "tags"}
    no_json = _fields(texts=(TextField("t", fake_tokenizer, source="summary.txt"),), json=())
    assert no_json.required_members() == {"summary.txt"}
    assert no_json.required_json_keys() == frozenset()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"json": (JsonField("caption", "boxes"),)},
         "'caption' is used by text field 'caption' and json field 'caption'"),
        ({"json": (JsonField("boxes", "boxes"), JsonField("boxes_mask", "m"))},
         "'boxes_mask' is used by json field 'boxes_mask' and the mask of json field 'boxes'"),
        ({"views": (ImageView("__key__", preprocess()),)},
         "'__key__' is used by the stream and image view '__key__'"),
        ({"views": (ImageView("a", preprocess()), ImageView("a", preprocess()))},
         "'a' is used by image view 'a' and image view 'a'"),
        ({"views": ()}, "at least one image view"),
    ],
)  # fmt: skip
def test_clashing_keys_are_refused_naming_the_clash(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _fields(**kw)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TextField("t", fake_tokenizer, choose="random"), "choose must be one of"),
        (lambda: TextField("t", fake_tokenizer, source="json:"), "source must be"),
        (lambda: TextField("t", fake_tokenizer, min_words=-1), "min_words"),
        (lambda: TextField("", fake_tokenizer), "non-empty"),
        (lambda: ImageView("v", "not callable"), "transform must be callable"),  # type: ignore[arg-type]
        (lambda: JsonField("j", ""), "json key"),
    ],
)
def test_bad_field_declarations_are_refused(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_fingerprint_parts_name_what_changes_the_batches() -> None:
    fields = _fields()
    assert fields.fingerprint_parts() == (
        ("view", "global", ""),
        ("view", "local", ""),
        ("text", "caption", "txt", "all", 0, "", ""),
        ("text", "report", "json:report", "sentence", 3, "minilm", SPLITTER),
        ("json", "boxes", "boxes"),
    )
    hash(fields.fingerprint_parts())  # it goes into the (hashable) StreamSpec
    preset = _fields(views=(ImageView("global", preprocess(), preset="convirt"),))
    assert preset.fingerprint_parts() != fields.fingerprint_parts()


def test_plain_source_recognises_todays_single_view_and_text() -> None:
    assert BatchFields.single(preprocess(), fake_tokenizer).plain_source() == "txt"
    single = BatchFields.single(preprocess(), fake_tokenizer, "json:report")
    assert single.plain_source() == "json:report"
    assert _fields().plain_source() is None
    named = BatchFields(
        views=(ImageView("image", preprocess(), preset="openclip"),),
        texts=(TextField("text", fake_tokenizer),),
    )
    assert named.plain_source() is None


def test_pick_draws_one_long_enough_sentence_from_the_seed() -> None:
    field = TextField("report", fake_tokenizer, choose="sentence", min_words=3)
    report = "FINDINGS: The lungs are clear. No effusion. Heart size is normal. IMPRESSION: Stable."
    long_enough = {"FINDINGS: The lungs are clear.", "Heart size is normal."}
    picks = [field.pick(report, seed) for seed in range(200)]
    assert set(picks) == long_enough
    assert 60 < picks.count("Heart size is normal.") < 140  # uniform over the two
    assert [field.pick(report, seed) for seed in range(200)] == picks
    with pytest.raises(SampleError, match="no sentence of at least 3 words"):
        field.pick("Stable. Unchanged.", 0)
    whole = TextField("t", fake_tokenizer)
    assert whole.pick(report, 5) == report


def test_numbers_become_a_tensor() -> None:
    assert torch.equal(collate_json("n", [1, 2, 3])["n"], torch.tensor([1, 2, 3]))
    floats = collate_json("x", [1, 2.5])["x"]
    assert floats.dtype == torch.float32 and floats.tolist() == [1.0, 2.5]
    assert collate_json("b", [True, False])["b"].dtype == torch.bool


def test_boxes_are_padded_to_the_longest_with_a_mask() -> None:
    boxes = [[[0.1, 0.2, 0.3, 0.4]], [], [[0, 0, 1, 1], [0.5, 0.5, 0.6, 0.7]]]
    out = collate_json("boxes", boxes)
    assert out["boxes"].shape == (3, 2, 4) and out["boxes"].dtype == torch.float32
    assert out["boxes_mask"].tolist() == [[True, False], [False, False], [True, True]]
    assert torch.equal(out["boxes"][0, 0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert torch.equal(out["boxes"][2], torch.tensor([[0, 0, 1, 1], [0.5, 0.5, 0.6, 0.7]]))
    assert not out["boxes"][~out["boxes_mask"]].any()  # padding is zero


def test_number_lists_and_string_lists_are_padded_with_a_mask() -> None:
    tags = collate_json("tags", [[3, 1], [2], []])
    assert tags["tags"].tolist() == [[3, 1], [2, 0], [0, 0]] and tags["tags"].dtype == torch.long
    assert tags["tags_mask"].tolist() == [[True, True], [True, False], [False, False]]
    words = collate_json("words", [["red", "star"], ["blue"]])
    assert words["words"] == [["red", "star"], ["blue", ""]]
    assert words["words_mask"].tolist() == [[True, True], [True, False]]
    empty = collate_json("e", [[], []])
    assert empty["e"].shape == (2, 0) and empty["e_mask"].shape == (2, 0)


def test_other_values_pass_through_as_a_list() -> None:
    assert collate_json("s", ["a", "b"]) == {"s": ["a", "b"]}
    ragged = [[[1, 2], [3]], [[4, 5]]]  # rows of unequal length: not a tensor
    assert collate_json("r", ragged) == {"r": ragged}
    dicts = [{"box": [0, 0, 1, 1]}, None]
    assert collate_json("d", dicts) == {"d": dicts}
