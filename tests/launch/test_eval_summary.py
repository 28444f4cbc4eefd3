"""The summary table of `vlp eval`: its footnotes appear exactly when their numbers do."""

from __future__ import annotations

import math

from launch.eval_summary import ACC5_NOTE, RANK_NOTE, summary_table


def retrieval(recall1: float, mean: float, median: float) -> dict[str, float]:
    return {
        "image_retrieval_recall@1": recall1,
        "text_retrieval_recall@1": 1.0,
        "image_retrieval_mean_rank": mean,
        "image_retrieval_median_rank": median,
        "text_retrieval_mean_rank": 1.0,
        "text_retrieval_median_rank": 1.0,
    }


def test_one_column_per_dataset_one_row_per_metric() -> None:
    table = summary_table([("a", {"acc1": 0.5, "acc5": 0.75}), ("wds/b", {"acc1": 0.25})])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "a", "wds/b"]
    assert lines[2].split() == ["acc1", "0.5000", "0.2500"]
    assert lines[3].split() == ["acc5", "0.7500", "-"]
    assert ACC5_NOTE not in table and RANK_NOTE not in table


def test_acc5_nan_gets_a_footnote() -> None:
    table = summary_table([("a", {"acc1": 0.5, "acc5": math.nan}), ("b", {"acc5": 0.9})])
    assert "acc5 [1]" in table and f"[1] {ACC5_NOTE}" in table
    assert table.count(ACC5_NOTE) == 1


def test_optimistic_tied_ranks_get_a_footnote() -> None:
    table = summary_table([("tied", retrieval(0.06, 1.0, 1.0))])
    assert "image_retrieval_mean_rank [1]" in table and f"[1] {RANK_NOTE}" in table
    assert table.count(RANK_NOTE) == 1
    assert "[1]" in table.splitlines()[-1]
    # median 1 needs half the queries first; a mean of 1.5 needs half of them first.
    assert RANK_NOTE in summary_table([("a", retrieval(0.3, 4.0, 1.0))])
    assert RANK_NOTE in summary_table([("a", retrieval(0.3, 1.5, 2.0))])
    # Ranks that recall@1 explains: no footnote.
    assert RANK_NOTE not in summary_table([("a", retrieval(0.6, 1.5, 1.0))])
    assert RANK_NOTE not in summary_table([("a", retrieval(0.06, 30.0, 20.0))])


def test_both_footnotes_are_numbered_in_order() -> None:
    table = summary_table([("a", {"acc5": math.nan, **retrieval(0.0, 1.0, 1.0)})])
    assert table.splitlines()[-2:] == [f"[1] {ACC5_NOTE}", f"[2] {RANK_NOTE}"]
