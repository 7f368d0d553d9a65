"""LogLLaMA's data roles and K: the validation carve, normal-only learning windows, and the choice of K."""

from __future__ import annotations

from pathlib import Path

import pytest

from logstream.records import LogLine, Window
from trainer.data import LabeledWindow, load_split
from trainer.logllama_data import carve_validation, tune_top_k

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"


def labelled(flags: list[bool]) -> list[LabeledWindow]:
    result = []
    for i, flag in enumerate(flags):
        line = LogLine("t", 0, i, raw="x", template="x", event_time=float(i), label=flag)
        result.append(LabeledWindow(Window("count", "t/0", "t", 0, [line], "size"), flag))
    return result


def test_chronological_carve_holds_out_the_latest_windows() -> None:
    items = labelled([False] * 8 + [True, False])
    carved = carve_validation(items, 0.2, chronological=True, seed=1)
    assert carved.fit == items[:8] and carved.validation == items[8:]


def test_random_carve_is_stratified_and_learning_windows_are_normal() -> None:
    items = labelled([i % 5 == 0 for i in range(100)])  # 20 anomalous
    carved = carve_validation(items, 0.25, chronological=False, seed=3)
    assert sum(w.label for w in carved.validation) == 5 and len(carved.validation) == 25
    assert carved.stage_windows() and not any(w.label for w in carved.stage_windows())
    assert not any(w.label for w in carved.vocabulary_windows())
    assert len(carved.vocabulary_windows()) == 80  # every normal train window, validation included
    assert carve_validation(items, 0.25, chronological=False, seed=3).validation == carved.validation  # seeded


def test_k_maximises_validation_f1_taking_the_middle_of_ties() -> None:
    # normal windows' worst ranks reach 3; anomalies rank 7, 9 and unseen (11 of 10 candidates)
    worst = [1, 2, 3, 2, 7, 9, 11]
    labels = [False, False, False, False, True, True, True]
    choice = tune_top_k(worst, labels, candidates=10)
    assert choice.rule == "f1" and choice.at_k["f1"] == 1.0
    assert choice.top_k == 4  # K = 3..6 all give F1 1.0: the middle (lower) one
    assert [entry["k"] for entry in choice.sweep] == list(range(1, 11))


def test_without_anomalies_k_is_the_smallest_with_an_acceptable_alarm_rate() -> None:
    worst = [1] * 90 + [2] * 6 + [4] * 3 + [11]
    choice = tune_top_k(worst, [False] * 100, candidates=10, max_alarm_rate=0.05)
    assert choice.rule == "alarm_rate" and choice.top_k == 2 and choice.at_k["alarm_rate"] == 0.04
    strict = tune_top_k(worst, [False] * 100, candidates=10, max_alarm_rate=0.005)
    assert strict.top_k == 10  # an unseen template alarms at any K: the largest K is the best there is
    fixed = tune_top_k(worst, [False] * 100, candidates=10, fixed=3)
    assert fixed.rule == "fixed" and fixed.top_k == 3
    with pytest.raises(ValueError, match="outside"):
        tune_top_k(worst, [False] * 100, candidates=10, fixed=11)


def test_hdfs_without_labels_needs_assume_normal_and_then_every_block_is_normal() -> None:
    logs = SAMPLES / "HDFS_2k.log"
    with pytest.raises(ValueError, match="label file"):
        load_split("hdfs", logs)
    with pytest.raises(ValueError, match="contradict"):
        load_split("hdfs", logs, SAMPLES / "anomaly_label_HDFS_2k.csv", assume_normal=True)
    split = load_split("hdfs", logs, assume_normal=True)
    labelled_split = load_split("hdfs", logs, SAMPLES / "anomaly_label_HDFS_2k.csv")
    assert split.stats["assume_normal"] and split.stats["labels"] is None
    assert not any(w.label for w in split.part("all"))
    assert len(split.part("all")) == len(labelled_split.part("all"))  # the same blocks (all are labelled)


def test_line_labels_are_ignored_when_assuming_normal() -> None:
    split = load_split("bgl", SAMPLES / "BGL_2k.log", window_size=50, assume_normal=True)
    truth = load_split("bgl", SAMPLES / "BGL_2k.log", window_size=50)
    assert any(w.label for w in truth.part("all")) and not any(w.label for w in split.part("all"))
    assert [w.window.window_id for w in split.part("all")] == [w.window.window_id for w in truth.part("all")]
