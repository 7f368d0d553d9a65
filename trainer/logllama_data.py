"""What LogLLaMA trains and tunes on: the validation carve, the normal-only stage-1 windows, keys, and K.

- Validation is carved from the *train* split (the test split stays untouched for evaluation): the
  last share of windows for chronological data sets (what comes next in time, as the test split
  does), a seeded stratified sample for HDFS (whose split is random by block).
- Stage 1 (and stage 2) learn from the remaining train windows labelled normal; labels are used
  only to drop anomalous windows. With `assume_normal` every window counts as normal.
- Keys are mined from every normal window of the train split (the learning windows *and* the
  normal validation windows): the vocabulary is "what normal traffic looked like", and on
  chronological data the held-out tail is the most recent normal traffic (BGL's sample grows a
  new frequent template in its last train windows). A template seen only in anomalous windows is
  `UNKNOWN`, as it will be in serving. A template seen only in validation is known but was never
  a training target, so the model ranks it low: a miss unless K is large.
- K is tuned on the validation windows' worst ranks (see `tune_top_k`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from logstream.logkeys import DrainOptions, LogKeyMiner, LogKeys
from trainer.data import LabeledWindow
from trainer.metrics import confusion


@dataclass(slots=True)
class Carved:
    """The train split divided for LogLLaMA."""

    fit: list[LabeledWindow]  # stage 1 and 2 learn from the normal ones
    validation: list[LabeledWindow]  # K is tuned here (both classes where labels exist)

    def stage_windows(self) -> list[LabeledWindow]:
        """The windows the model learns from: normal ones only (labels used to drop, nothing else)."""
        return [item for item in self.fit if not item.label]

    def vocabulary_windows(self) -> list[LabeledWindow]:
        """The windows whose lines define the known templates: every normal train window, in stream order."""
        return [item for item in self.fit + self.validation if not item.label]


def carve_validation(train: Sequence[LabeledWindow], fraction: float, *, chronological: bool,
                     seed: int) -> Carved:
    """Hold out `fraction` of the train windows for tuning K (last ones in time, or a stratified sample)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    items = list(train)
    if len(items) < 2:
        raise ValueError(f"the train split has {len(items)} window(s); at least 2 are needed to hold out validation")
    if chronological:
        cut = min(len(items) - 1, max(1, round(len(items) * (1.0 - fraction))))
        return Carved(items[:cut], items[cut:])
    rng = random.Random(seed)
    held: set[int] = set()
    for label in (True, False):
        indices = [i for i, item in enumerate(items) if item.label == label]
        take = round(len(indices) * fraction)
        held.update(rng.sample(indices, min(take, len(indices))))
    if not held or len(held) == len(items):
        held = {len(items) - 1}
    return Carved([item for i, item in enumerate(items) if i not in held],
                  [item for i, item in enumerate(items) if i in held])


def mine_keys(windows: Sequence[LabeledWindow], options: DrainOptions) -> LogKeys:
    """Drain templates over the masked lines of `windows`, in stream order, frozen into keys."""
    miner = LogKeyMiner(options)
    for item in windows:
        miner.add_all(item.window.templates)
    return miner.freeze()


@dataclass(slots=True)
class TopKChoice:
    """The K chosen on validation, how, and the validation metrics at every K."""

    top_k: int
    rule: str  # "f1" (labels with both classes), "alarm_rate" (normal windows only), or "fixed"
    at_k: dict[str, Any]
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "rule": self.rule, "validation": self.at_k, "sweep": self.sweep}


def tune_top_k(worst_ranks: Sequence[int], labels: Sequence[bool], candidates: int, *,
               max_alarm_rate: float = 0.01, fixed: int | None = None) -> TopKChoice:
    """Choose K from the validation windows' worst ranks (a window is flagged at K iff worst rank > K).

    - `fixed`: that K (validation metrics still reported);
    - labels of both classes: the K with the best F1; where several K tie, the middle one, so the
      boundary does not sit right on a validation window;
    - otherwise (no anomalies, or none separable): the smallest K that flags at most
      `max_alarm_rate` of the normal validation windows (the most sensitive model whose false
      alarm rate is acceptable); K = candidates if none does (unseen templates always alarm).
    """
    if len(worst_ranks) != len(labels) or not worst_ranks:
        raise ValueError("need one label per validation window, and at least one window")
    if candidates < 1:
        raise ValueError("no candidate keys")
    sweep = []
    normal = [r for r, label in zip(worst_ranks, labels) if not label]
    for k in range(1, candidates + 1):
        predicted = [r > k for r in worst_ranks]
        counts = confusion(labels, predicted)
        alarms = sum(1 for r in normal if r > k)
        sweep.append({"k": k, "precision": round(counts.precision, 6), "recall": round(counts.recall, 6),
                      "f1": round(counts.f1, 6), "flagged": sum(predicted),
                      "alarm_rate": round(alarms / len(normal), 6) if normal else None})
    if fixed is not None:
        if not 1 <= fixed <= candidates:
            raise ValueError(f"--top-k {fixed} outside 1..{candidates} (the number of candidate keys)")
        return TopKChoice(fixed, "fixed", sweep[fixed - 1], sweep)
    best = max(entry["f1"] for entry in sweep)
    if any(labels) and not all(labels) and best > 0:
        tied = [entry["k"] for entry in sweep if entry["f1"] == best]
        k = tied[(len(tied) - 1) // 2]
        return TopKChoice(k, "f1", sweep[k - 1], sweep)
    if not normal:
        raise ValueError("no normal validation windows to tune K on")
    k = next((entry["k"] for entry in sweep if entry["alarm_rate"] <= max_alarm_rate), candidates)
    return TopKChoice(k, "alarm_rate", sweep[k - 1], sweep)
