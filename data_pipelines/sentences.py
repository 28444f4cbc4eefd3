"""Split report text into sentences, for text fields that draw one sentence per sample.

ConVIRT (Zhang et al., 2020) pairs an image with one sentence sampled from its radiology report
at every step. Reports are full of periods that do not end a sentence ("e.g.", "Dr.", "No. 4",
"1.5 cm", "p.m.", numbered lists "1. ... 2. ..."), so a naive split on ". " cuts sentences in
half. We use pySBD (PyPI ``pysbd``), a maintained rule-based sentence boundary detector with
English abbreviation and number rules (Sadvilkar & Neumann, 2020), rather than writing rules of
our own. Its output is a pure function of the text and the pySBD version: :data:`SPLITTER`
names that version, and the stream puts it into the resume fingerprint of any text field that
chooses sentences, so a resume never silently draws from differently split reports.
"""

from __future__ import annotations

import functools

import pysbd

SPLITTER = f"pysbd-{pysbd.__version__}"
"""What splits the sentences, with its version (part of a stream's resume fingerprint)."""


@functools.lru_cache(maxsize=1)
def _segmenter() -> pysbd.Segmenter:
    # Built once per process, on first use (no work at import). clean=False: pySBD's cleaner
    # rewrites the text (joins lines, drops characters); we want the report's own words.
    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, empty ones dropped, in order.

    ``"Heart size is normal. Dr. Smith was notified."`` gives two sentences; abbreviations
    ("e.g.", "Dr.", "No."), decimals ("1.5 cm") and list numbers ("1. Stable ...") stay
    inside their sentence. Text without a sentence end is one sentence.
    """
    if not text.strip():
        return []
    return [s.strip() for s in _segmenter().segment(text) if s.strip()]


def word_count(sentence: str) -> int:
    """Words in ``sentence``, split on whitespace: what ``TextField.min_words`` counts."""
    return len(sentence.split())
