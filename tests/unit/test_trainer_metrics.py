"""Evaluation arithmetic: confusion counts, P/R/F1 with their edge cases, the threshold sweep."""

from __future__ import annotations

import pytest

from trainer.metrics import Confusion, average_precision, confusion, threshold_sweep


def test_confusion_counts_and_ratios() -> None:
    labels = [True, True, True, False, False, False, False, True]
    predicted = [True, True, False, True, False, False, False, False]
    counts = confusion(labels, predicted)
    assert counts == Confusion(tp=2, fp=1, fn=2, tn=3)
    assert counts.precision == pytest.approx(2 / 3)
    assert counts.recall == pytest.approx(2 / 4)
    assert counts.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert counts.undefined == ()
    assert counts.as_dict() | {"precision": 0, "recall": 0, "f1": 0} == {
        "precision": 0, "recall": 0, "f1": 0, "tp": 2, "fp": 1, "fn": 2, "tn": 3, "windows": 8,
        "anomalous_windows": 4, "undefined": []}


def test_no_anomalies_and_none_predicted_is_zero_and_named_undefined() -> None:
    counts = confusion([False] * 5, [False] * 5)
    assert (counts.precision, counts.recall, counts.f1) == (0.0, 0.0, 0.0)
    assert counts.undefined == ("precision", "recall", "f1")
    assert counts.tn == 5 and counts.anomalous_windows == 0


def test_nothing_predicted_with_anomalies_present() -> None:
    counts = confusion([True, False, True], [False, False, False])
    assert counts == Confusion(tp=0, fp=0, fn=2, tn=1)
    assert (counts.precision, counts.recall, counts.f1) == (0.0, 0.0, 0.0)
    assert counts.undefined == ("precision",)


def test_false_alarms_only_when_there_are_no_anomalies() -> None:
    counts = confusion([False, False], [True, False])
    assert (counts.precision, counts.recall, counts.f1) == (0.0, 0.0, 0.0)
    assert counts.undefined == ("recall",)


def test_perfect_and_empty() -> None:
    perfect = confusion([True, False, True], [True, False, True])
    assert (perfect.precision, perfect.recall, perfect.f1) == (1.0, 1.0, 1.0)
    empty = confusion([], [])
    assert empty.windows == 0 and empty.undefined == ("precision", "recall", "f1")
    with pytest.raises(ValueError):
        confusion([True], [])


def test_threshold_sweep_one_point_per_distinct_score() -> None:
    labels = [True, False, True, False, False]
    scores = [90.0, 80.0, 80.0, 10.0, 0.0]
    sweep = threshold_sweep(labels, scores)
    assert sweep.thresholds == [90.0, 80.0, 10.0, 0.0]
    assert sweep.precision == pytest.approx([1.0, 2 / 3, 2 / 4, 2 / 5])
    assert sweep.recall == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert sweep.best_f1() == (80.0, pytest.approx(0.8))
    # each point equals the confusion of "score >= threshold"
    for threshold, precision in zip(sweep.thresholds, sweep.precision):
        assert confusion(labels, [s >= threshold for s in scores]).precision == pytest.approx(precision)


def test_average_precision() -> None:
    assert average_precision([True, False, True], [90.0, 50.0, 80.0]) == pytest.approx(1.0)
    # ranks: T(1/1) F T(2/3): AP = 0.5 * 1 + 0.5 * 2/3
    assert average_precision([True, False, True], [90.0, 80.0, 50.0]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([False, False], [1.0, 2.0]) is None
    assert threshold_sweep([], []).best_f1() is None
