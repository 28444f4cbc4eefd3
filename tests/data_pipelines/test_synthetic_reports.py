"""The procedural dataset's radiology-style reports: present, deterministic per seed, sentences a
model can learn the class from (each sentence of 3 words or more names it) and very short
sentences; every other output unchanged."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from data_pipelines.synthetic import CLASSNAMES, REPORT_SECTIONS, generate_samples, render_sample


def _sections(report: str) -> dict[str, list[str]]:
    """Section name -> sentences, for the report layout 'NAME:\\nsentence sentence ...'."""
    blocks = [block.split(":\n", 1) for block in report.split("\n\n")]
    return {name: re.split(r"(?<=\.) ", body) for name, body in blocks}


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_reports_are_deterministic_per_seed_and_vary(seed):
    first = [s["json"]["report"] for s in generate_samples(60, seed=seed)]
    again = [s["json"]["report"] for s in generate_samples(60, seed=seed)]
    assert first == again
    assert first[7] == render_sample(7, seed=seed)["json"]["report"]
    assert len(set(first)) > 50
    assert first != [s["json"]["report"] for s in generate_samples(60, seed=seed + 1)]


@pytest.mark.parametrize("seed", range(6))
def test_every_kept_sentence_names_the_class_and_short_sentences_are_there(seed):
    coloured = 0
    for sample in generate_samples(80, seed=seed):
        meta = sample["json"]
        sections = _sections(meta["report"])
        assert tuple(sections) == REPORT_SECTIONS
        sentences = [s for body in sections.values() for s in body]
        assert all(s.endswith(".") and s[0].isupper() for s in sentences), sentences
        kept = [s for s in sentences if len(s.split()) >= 3]
        shape = CLASSNAMES[sample["cls"]]
        coloured += bool(re.search(rf"\b{meta['colour']}\b", meta["report"]))
        assert any(shape in s.lower() for s in sections["IMPRESSION"])
        # ConVIRT samples one kept sentence: a filler there (the reports before 2026-12-08 had
        # one or two per report) kept its demo at chance (benchmarks/RESULTS.md).
        assert kept and all(shape in s.lower() for s in kept), kept
        assert 2 <= len(kept) <= 3, "the shape's sentence, maybe a detail, the impression"
        assert any(len(s.split()) < 3 for s in sentences), "very short sentences"
    # The colour is in some reports, not all: named often, it would be learnt before the shape.
    assert 0.2 < coloured / 80 < 0.8


def test_fields_other_than_the_report_are_as_before_reports_existed():
    """Pinned from the generator before reports were rewritten: captions, classes, metadata
    and image bytes of seed 0 must not move when the report changes."""
    digest = hashlib.sha256()
    for sample in generate_samples(64, seed=0):
        meta = {k: v for k, v in sample["json"].items() if k != "report"}
        digest.update(json.dumps([sample["key"], sample["txt"], sample["cls"], meta]).encode())
        digest.update(np.asarray(sample["image"]).tobytes())
    assert digest.hexdigest() == PINNED


PINNED = "0b85a7e4a89edc4aa87a4df538a8f881317164c95a565e59947349390c896ba0"
