"""Window-level detection metrics: the confusion counts, P/R/F1 and the sweep over score thresholds.

Anomalous is the positive class. Where a ratio has a zero denominator (no predicted positives, no
true positives in the data) it is reported as 0.0, the common convention, and *named* in
`undefined` so a reader can tell "0 because wrong" from "0 because there was nothing to find".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Confusion:
    """Counts of one detector's verdicts against the ground truth."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def windows(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def anomalous_windows(self) -> int:
        return self.tp + self.fn

    @property
    def precision(self) -> float:
        predicted = self.tp + self.fp
        return self.tp / predicted if predicted else 0.0

    @property
    def recall(self) -> float:
        actual = self.tp + self.fn
        return self.tp / actual if actual else 0.0

    @property
    def f1(self) -> float:
        # 2PR/(P+R) written on the counts: defined whenever any window is positive or predicted so
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    @property
    def undefined(self) -> tuple[str, ...]:
        """Metrics whose denominator is zero (reported as 0.0)."""
        names = []
        if self.tp + self.fp == 0:
            names.append("precision")
        if self.tp + self.fn == 0:
            names.append("recall")
        if 2 * self.tp + self.fp + self.fn == 0:
            names.append("f1")
        return tuple(names)

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": round(self.precision, 6),
            "recall": round(self.recall, 6),
            "f1": round(self.f1, 6),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "windows": self.windows,
            "anomalous_windows": self.anomalous_windows,
            "undefined": list(self.undefined),
        }


def confusion(labels: Sequence[bool], predicted: Sequence[bool]) -> Confusion:
    """Confusion counts of `predicted` against `labels` (True = anomalous), position by position."""
    if len(labels) != len(predicted):
        raise ValueError(f"{len(labels)} labels but {len(predicted)} predictions")
    tp = fp = fn = 0
    for truth, guess in zip(labels, predicted):
        if guess and truth:
            tp += 1
        elif guess:
            fp += 1
        elif truth:
            fn += 1
    return Confusion(tp=tp, fp=fp, fn=fn, tn=len(labels) - tp - fp - fn)


@dataclass(frozen=True, slots=True)
class ThresholdSweep:
    """Precision, recall and F1 when "score >= threshold" is the verdict, for every distinct score."""

    thresholds: list[float]  # descending
    precision: list[float]
    recall: list[float]
    f1: list[float]

    def best_f1(self) -> tuple[float, float] | None:
        """(threshold, F1) of the best threshold, ties to the highest threshold; None without scores."""
        if not self.thresholds:
            return None
        best = max(range(len(self.f1)), key=lambda i: (self.f1[i], self.thresholds[i]))
        return self.thresholds[best], self.f1[best]


def threshold_sweep(labels: Sequence[bool], scores: Sequence[float]) -> ThresholdSweep:
    """Every operating point a score threshold can give (one per distinct score, highest first)."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    positives = sum(1 for label in labels if label)
    thresholds: list[float] = []
    precision: list[float] = []
    recall: list[float] = []
    f1: list[float] = []
    tp = fp = 0
    for rank, index in enumerate(order):
        if labels[index]:
            tp += 1
        else:
            fp += 1
        last_of_score = rank + 1 == len(order) or scores[order[rank + 1]] != scores[index]
        if not last_of_score:
            continue
        counts = Confusion(tp=tp, fp=fp, fn=positives - tp, tn=len(order) - positives - fp)
        thresholds.append(float(scores[index]))
        precision.append(counts.precision)
        recall.append(counts.recall)
        f1.append(counts.f1)
    return ThresholdSweep(thresholds, precision, recall, f1)


def average_precision(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the precision-recall steps (sum of precision x recall gained); None without positives."""
    if not any(labels):
        return None
    sweep = threshold_sweep(labels, scores)
    area = previous_recall = 0.0
    for precision, recall in zip(sweep.precision, sweep.recall):
        area += (recall - previous_recall) * precision
        previous_recall = recall
    return area
