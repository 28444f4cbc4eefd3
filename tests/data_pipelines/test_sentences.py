"""Report text -> sentences: abbreviations, decimals and list numbers stay inside a sentence."""

from __future__ import annotations

import pytest

from data_pipelines.sentences import SPLITTER, split_sentences, word_count
from data_pipelines.synthetic import render_sample


@pytest.mark.parametrize(
    "report,sentences",
    [
        (
            "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
            ["The lungs are clear.", "No pleural effusion or pneumothorax.",
             "Heart size is normal."],
        ),
        (
            "Compared to the prior study, there is a 1.5 cm nodule in the RUL. Dr. Smith was "
            "notified at 3:45 p.m. on 3.4.2016.",
            ["Compared to the prior study, there is a 1.5 cm nodule in the RUL.",
             "Dr. Smith was notified at 3:45 p.m. on 3.4.2016."],
        ),
        (
            "No focal consolidation, e.g. pneumonia. Dr. Lee reviewed image No. 3 with the team.",
            ["No focal consolidation, e.g. pneumonia.",
             "Dr. Lee reviewed image No. 3 with the team."],
        ),
        (
            "1. Stable cardiomegaly. 2. Small left pleural effusion, unchanged. 3. No focal "
            "consolidation.",
            ["1. Stable cardiomegaly.", "2. Small left pleural effusion, unchanged.",
             "3. No focal consolidation."],
        ),
        (
            "Stable 2.3 x 1.4 cm mass in the L. lower lobe. Follow-up in 3 mo. recommended.",
            ["Stable 2.3 x 1.4 cm mass in the L. lower lobe.", "Follow-up in 3 mo. recommended."],
        ),
        (
            "No evidence of pneumonia vs. atelectasis. Mild degenerative changes, i.e. "
            "osteophytes.  ",
            ["No evidence of pneumonia vs. atelectasis.",
             "Mild degenerative changes, i.e. osteophytes."],
        ),
        (
            "There is no pneumothorax! Is there an effusion? No.",
            ["There is no pneumothorax!", "Is there an effusion?", "No."],
        ),
        (
            "FINDINGS:\nThe lungs are clear. No effusion.\n\nIMPRESSION:\nNo acute process.",
            ["FINDINGS:", "The lungs are clear.", "No effusion.", "IMPRESSION:",
             "No acute process."],
        ),
        ("the lungs are clear. no effusion.", ["the lungs are clear.", "no effusion."]),
        ("PA and lateral views of the chest", ["PA and lateral views of the chest"]),
        ("", []),
        (" \n\t ", []),
    ],
)  # fmt: skip
def test_radiology_reports_split_at_sentence_ends_only(report: str, sentences: list[str]) -> None:
    assert split_sentences(report) == sentences


def test_the_procedural_reports_split_into_sentences_keeping_every_word() -> None:
    for index in range(20):
        report = render_sample(index, seed=0)["json"]["report"]
        parts = split_sentences(report)
        assert len(parts) >= 2 and " ".join(parts).split() == report.split()
        assert all(p.endswith((".", ":", "!", "?")) for p in parts)


def test_word_count_splits_on_whitespace() -> None:
    assert word_count("No acute process.") == 3
    assert word_count("IMPRESSION:") == 1
    assert word_count("  Heart\tsize  normal.\n") == 3


def test_the_splitter_is_named_with_its_version() -> None:
    assert SPLITTER.startswith("pysbd-") and SPLITTER[len("pysbd-") :][0].isdigit()
