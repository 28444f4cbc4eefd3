"""The procedural default dataset: determinism, fields, and captions unlike the eval prompts."""

from __future__ import annotations

import numpy as np

from data_pipelines.synthetic import (
    CLASSNAMES,
    COLOURS,
    EVAL_TEMPLATES,
    SHAPES,
    generate_samples,
)


def _as_tuple(sample: dict) -> tuple:
    return (
        sample["key"],
        sample["txt"],
        sample["cls"],
        sample["json"],
        np.asarray(sample["image"]).tobytes(),
    )


def test_same_seed_same_samples_and_prefix_stable() -> None:
    a = [_as_tuple(s) for s in generate_samples(20, seed=3)]
    b = [_as_tuple(s) for s in generate_samples(20, seed=3)]
    assert a == b
    assert [_as_tuple(s) for s in generate_samples(5, seed=3)] == a[:5]
    c = [_as_tuple(s) for s in generate_samples(20, seed=4)]
    assert [x[1] for x in a] != [x[1] for x in c]


def test_sample_fields() -> None:
    for i, s in enumerate(generate_samples(50, seed=0)):
        assert s["key"] == f"{i:09d}" and len(s["key"]) == 9
        assert s["image"].mode == "RGB" and s["image"].size == (32, 32)
        assert 0 <= s["cls"] < len(CLASSNAMES)
        meta = s["json"]
        shape = CLASSNAMES[s["cls"]]
        assert meta["class"] == shape and meta["colour"] in COLOURS
        assert meta["summary"] == f"{meta['colour']} {shape}"
        assert meta["report"].count(".") >= 3  # shape, short sentence(s), impression
        (obj,) = meta["objects"]
        x0, y0, x1, y1 = obj["box"]
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert (x1 - x0) * (y1 - y0) > 0.1, "the shape should cover a good part of the image"
        assert obj["tag"] == shape and obj["attributes"] == [meta["colour"], meta["size"]]


def test_image_size_parameter() -> None:
    (s,) = generate_samples(1, seed=0, image_size=64)
    assert s["image"].size == (64, 64)


def test_classes_are_many_distinct_and_all_drawn() -> None:
    assert len(SHAPES) >= 8 and len(set(CLASSNAMES)) == len(CLASSNAMES)
    seen = {s["cls"] for s in generate_samples(300, seed=1)}
    assert seen == set(range(len(CLASSNAMES)))


def test_captions_name_the_shape_but_never_use_eval_templates() -> None:
    prompts = {t.format(c=c) for t in EVAL_TEMPLATES for c in CLASSNAMES}
    prefixes = tuple(t.split("{c}")[0].strip() for t in EVAL_TEMPLATES)
    captions = []
    for s in generate_samples(500, seed=2):
        txt = s["txt"]
        assert txt not in prompts
        assert not txt.startswith(prefixes), txt
        assert CLASSNAMES[s["cls"]] in txt.split() or f"{CLASSNAMES[s['cls']]}," in txt
        captions.append(txt)
    assert len(set(captions)) > 100, "captions should vary"


def test_shape_contrasts_with_background() -> None:
    for s in generate_samples(30, seed=5):
        img = np.asarray(s["image"], np.float32)
        x0, y0, x1, y1 = (int(v * 32) for v in s["json"]["objects"][0]["box"])
        centre = img[(y0 + y1) // 2, (x0 + x1) // 2]
        outside = [
            (y, x) for y in (0, 31) for x in (0, 31) if not (x0 <= x <= x1 and y0 <= y <= y1)
        ]
        corner = img[outside[0]]
        if s["json"]["class"] != "ring":  # a ring's centre is background
            assert np.abs(centre - corner).sum() > 60, s["json"]
