"""Distinct training windows with multiplicities: what LogLLM's fine-tuning iterates over.

Logs repeat: most HDFS sessions are exact repeats of a few hundred masked sequences, and BGL count
windows of one period repeat each other. The model sees a window as its (capped) sequence of masked
messages, so two windows with the same sequence and the same label are the same training example.
`distinct_windows` groups them; each distinct window carries `count` (how many train windows it
stands for) and a `weight`, the count rescaled so that the minority class holds `beta` of the total
weight (`class_weights`): the paper's minority oversampling, acting on weights instead of copies.

An epoch of a stage visits every distinct window once; the loss of a step is the weighted mean
over its windows, so the objective is the oversampled stream's, at the cost of the distinct data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from logstream.model import MessageView, model_view
from trainer.data import LabeledWindow


@dataclass(frozen=True, slots=True)
class DistinctWindow:
    """One distinct (message sequence, label) of the train split."""

    templates: tuple[str, ...]  # the window as the model sees it (`model_view`: the latest `max_messages`)
    label: bool
    count: int  # train windows with this sequence and label
    weight: float  # count x the class weight (minority oversampled to beta)
    example: LabeledWindow  # the first such window, in stream order


def distinct_windows(windows: Sequence[LabeledWindow], max_messages: int,
                     view: MessageView = "lines") -> list[tuple[tuple[str, ...], bool, int, LabeledWindow]]:
    """(templates the model sees, label, count, first window) per distinct pair, in order of first appearance."""
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {max_messages}")
    groups: dict[tuple[tuple[str, ...], bool], list[Any]] = {}
    for item in windows:
        key = (tuple(model_view(item.window.templates, max_messages, view)), bool(item.label))
        entry = groups.get(key)
        if entry is None:
            groups[key] = [key[0], key[1], 1, item]
        else:
            entry[2] += 1
    return [(templates, label, count, first) for templates, label, count, first in groups.values()]


def class_weights(anomalous: float, normal: float, beta: float) -> dict[bool, float]:
    """Per-window weight of each class so the minority holds at least `beta` of the total weight.

    The majority keeps weight 1; the minority gets `beta/(1-beta) * majority/minority` when it is
    below `beta`, else 1 (as `trainer.data.oversample` leaves a balanced set alone). ValueError if
    a class is missing or beta is outside (0, 0.5].
    """
    if not 0.0 < beta <= 0.5:
        raise ValueError(f"beta must be in (0, 0.5], got {beta}")
    if anomalous <= 0 or normal <= 0:
        raise ValueError(f"both classes are needed ({anomalous} anomalous, {normal} normal windows)")
    minority_is_anomalous = anomalous <= normal
    minority, majority = (anomalous, normal) if minority_is_anomalous else (normal, anomalous)
    factor = max(1.0, beta / (1.0 - beta) * majority / minority)
    return {minority_is_anomalous: factor, not minority_is_anomalous: 1.0}


def weighted_distinct(windows: Sequence[LabeledWindow], max_messages: int, beta: float,
                      view: MessageView = "lines", count_power: float = 1.0) -> list[DistinctWindow]:
    """The distinct windows of `windows`, each weighted by count ** `count_power` x class weight.

    `count_power` 1 is the stream's own objective (a window counts as often as it occurs); below 1 a
    rare sequence weighs more against a frequent one of its class (0: every distinct window alike),
    so a normal pattern seen twice is not drowned by one seen a thousand times. The class weights
    act on the tempered totals. ValueError outside [0, 1]."""
    if not 0.0 <= count_power <= 1.0:
        raise ValueError(f"count_power must be in [0, 1], got {count_power}")
    groups = distinct_windows(windows, max_messages, view)
    anomalous = sum(count ** count_power for _, label, count, _ in groups if label)
    normal = sum(count ** count_power for _, label, count, _ in groups if not label)
    weights = class_weights(anomalous, normal, beta)
    return [DistinctWindow(templates, label, count, count ** count_power * weights[label], first)
            for templates, label, count, first in groups]
