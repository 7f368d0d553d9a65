"""The validation share of a fit: carved from the train split, used to pick the stage and the threshold.

The test split is never looked at while training. `carve_validation` holds out part of the train
split the way the test split itself was made: the LAST `fraction` of the train windows for
time-ordered logs (BGL, Thunderbird, Liberty: the model is judged on a later period, as in
production), a stratified random share of the sessions' keys for HDFS (whole blocks, each class in
proportion). `choose_threshold` picks the decision threshold on P(anomalous) with the best F1 on
the validation windows; with no anomalous (or no normal) window there it falls back to 0.5, the
LLM's own answer, and says so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from logstream.model import DEFAULT_THRESHOLD
from trainer.data import LabeledWindow
from trainer.metrics import average_precision, threshold_sweep

CHRONOLOGICAL = "chronological"
STRATIFIED = "stratified"
# Thresholds stay this far from 0 and 1, so the calibrated score (a log-odds shift) stays finite.
_EDGE = 1e-6


def carve_validation(train: Sequence[LabeledWindow], fraction: float, *, chronological: bool,
                     seed: int) -> tuple[list[LabeledWindow], list[LabeledWindow]]:
    """(windows to fit on, validation windows); `fraction` 0 gives no validation share.

    Chronological: the last ceil(fraction x n) windows in stream order. Stratified: sessions are
    grouped by key (an HDFS block can close several sessions) and a seeded share of the anomalous
    keys and of the normal keys is held out. Both parts keep stream order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or not train:
        return list(train), []
    if chronological:
        cut = len(train) - math.ceil(fraction * len(train))
        return list(train[:cut]), list(train[cut:])
    anomalous_keys: dict[str, None] = {}
    normal_keys: dict[str, None] = {}
    for item in train:
        (anomalous_keys if item.label else normal_keys).setdefault(item.window.key, None)
    normal_keys = {key: None for key in normal_keys if key not in anomalous_keys}
    rng = random.Random(f"{seed}/validation")
    held: set[str] = set()
    for keys in (list(anomalous_keys), list(normal_keys)):
        held.update(rng.sample(keys, round(fraction * len(keys))))
    return ([item for item in train if item.window.key not in held],
            [item for item in train if item.window.key in held])


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen threshold on P(anomalous) and how it was chosen (stored in the artifact's logllm.json)."""

    threshold: float
    source: str  # "validation" or "fallback"
    reason: str
    validation_f1: float | None = None
    validation_precision: float | None = None
    validation_recall: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "source": self.source, "reason": self.reason,
                "validation_f1": self.validation_f1, "validation_precision": self.validation_precision,
                "validation_recall": self.validation_recall}


def choose_threshold(labels: Sequence[bool], probabilities: Sequence[float]) -> Decision:
    """The threshold with the best validation F1 (ties: the highest), halfway to the next lower score.

    "p >= threshold" is the verdict. Falls back to 0.5 when the validation windows hold one class
    only (there is no F1 to maximise): the reason names what was missing.
    """
    anomalous = sum(1 for label in labels if label)
    if not labels or anomalous == 0 or anomalous == len(labels):
        missing = "no validation windows" if not labels else (
            "no anomalous window" if anomalous == 0 else "no normal window")
        return Decision(DEFAULT_THRESHOLD, "fallback",
                        f"the validation share has {missing}: the threshold falls back to {DEFAULT_THRESHOLD} "
                        "(the LLM's own answer); use more data or a larger --validation-fraction")
    sweep = threshold_sweep(labels, probabilities)
    best = max(range(len(sweep.f1)), key=lambda i: (sweep.f1[i], sweep.thresholds[i]))
    at = sweep.thresholds[best]
    below = sweep.thresholds[best + 1] if best + 1 < len(sweep.thresholds) else 0.0
    threshold = min(max((at + below) / 2.0, _EDGE), 1.0 - _EDGE)
    return Decision(threshold, "validation", f"best F1 on {len(labels)} validation windows ({anomalous} anomalous)",
                    round(sweep.f1[best], 6), round(sweep.precision[best], 6), round(sweep.recall[best], 6))


def validation_ap(labels: Sequence[bool], probabilities: Sequence[float]) -> float | None:
    """Average precision on the validation windows (None without an anomalous one)."""
    value = average_precision(labels, probabilities)
    return None if value is None else round(value, 6)
