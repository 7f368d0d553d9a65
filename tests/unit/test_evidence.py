"""Alert evidence without a model: ranked messages placed on a window's lines, and its grading."""

from __future__ import annotations

import math

import pytest

from logstream.attribution import (
    MAX_EVIDENCE,
    REASON,
    Attribution,
    first_seen_line,
    localize,
    log_odds,
    ranking_evidence,
)
from logstream.records import LogLine, Verdict, Window
from logstream.tail import format_alert
from trainer.evidence import EvidenceTally, evidence_markdown, random_hit


def window(templates: list[str], labels: list[bool] | None = None, first_offset: int = 100) -> Window:
    lines = [LogLine("t", 0, first_offset + i, raw=f"raw {t}", template=t, event_time=float(i),
                     label=None if labels is None else labels[i]) for i, t in enumerate(templates)]
    return Window("count", "t/0", "t", 0, lines, "size")


def test_ranking_keeps_the_messages_that_push_towards_anomalous_strongest_first() -> None:
    ranking = tuple((f"m{i}", 1.0 - i / 4) for i in range(8))  # 1.0, 0.75, 0.5, 0.25, 0, -0.25, ...
    items = ranking_evidence(Attribution("occlusion", ranking, rows=8, seconds=0.1))
    assert [i["template"] for i in items] == ["m0", "m1", "m2", "m3"]
    assert all(i["method"] == "occlusion" for i in items)
    many = tuple((f"m{i}", 10.0 - i) for i in range(9))
    assert len(ranking_evidence(Attribution("gradient", many, 1, 0.0))) == MAX_EVIDENCE
    # nothing pushes towards "anomalous" on its own: the strongest message is still named
    alone = ranking_evidence(Attribution("occlusion", (("a", -0.1), ("b", -0.5)), 2, 0.0))
    assert [i["template"] for i in alone] == ["a"]


def test_localize_names_the_first_seen_line_of_each_message_with_its_count() -> None:
    w = window(["a", "b", "a", "c", "b", "b"])
    ranked = [{"template": "b", "contribution": 0.9, "method": "occlusion"},
              {"template": "a", "contribution": 0.2, "method": "occlusion"}]
    items = localize(w, 0, ranked)
    assert [(i["line"], i["offset"], i["count"], i["template"]) for i in items] == [(1, 101, 3, "b"), (0, 100, 2, "a")]
    assert all(i["reason"] == REASON for i in items)
    # the model saw only the latest 4 lines: indices and counts refer to those
    seen = localize(w, 2, ranked)
    assert [(i["line"], i["count"]) for i in seen] == [(4, 2), (2, 1)]


def test_log_odds_is_symmetric_and_clamped() -> None:
    assert log_odds(0.5) == 0.0
    assert log_odds(0.9) == pytest.approx(-log_odds(0.1))
    assert math.isfinite(log_odds(1.0)) and math.isfinite(log_odds(0.0))


def test_random_floor_is_the_exact_chance_of_three_random_lines() -> None:
    assert random_hit(1, 100) == pytest.approx(0.03)
    assert random_hit(0, 10) == 0.0
    assert random_hit(98, 100) == 1.0
    assert random_hit(2, 4) == pytest.approx(1.0)  # 3 of 4 lines always include one of 2 tagged


def test_tally_grades_top_three_lines_and_the_first_one() -> None:
    labels = [False] * 10
    labels[7] = True
    w = window([f"m{i}" for i in range(10)], labels)
    tally = EvidenceTally()
    tally.add(w, Verdict(True, 90.0, evidence=({"line": 2}, {"line": 7}, {"line": 3})))  # hit, not first
    tally.add(w, Verdict(True, 90.0, evidence=({"line": 7},)))  # hit and first
    tally.add(w, Verdict(True, 90.0, evidence=({"line": 1}, {"line": 2}, {"line": 3}, {"line": 7})))  # 4th: miss
    tally.add(w, Verdict(True, 90.0))  # no evidence: a miss
    tally.add(window(["x"] * 3), Verdict(True, 90.0, evidence=({"line": 0},)))  # no line labels: not counted
    report = tally.as_dict()
    assert report["true_positives"] == 4 and report["without_evidence"] == 1
    assert report["hit_rate"] == 0.5 and report["first_line_hit_rate"] == 0.25
    assert report["random_floor"] == pytest.approx(0.3)
    assert report["extra_seconds_per_anomalous_window"] == 0.0
    assert "| logllm | 4 | 0.500 | 0.250 | 0.300 | 0.000 |" in evidence_markdown({"logllm": report})


def test_the_alerts_tail_prints_logllm_evidence_with_count_and_contribution() -> None:
    alert = {
        "verdict": {"severity": "high", "score": 80.0}, "source": {"topic": "t", "partition": 0, "first_offset": 0,
                                                                 "last_offset": 9},
        "window": {"kind": "count", "key": "t/0", "size": 10}, "event_time": {"first": "2005-06-03T15:42:50Z"},
        "evidence": [{"line": 3, "offset": 3, "reason": REASON, "template": "KERNEL FATAL <*>", "count": 7,
                      "contribution": 1.234, "method": "occlusion"}],
        "sample_lines": [{"offset": 3, "line": "- 1117838570 KERNEL FATAL x"}],
    }
    text = format_alert(alert)
    assert f"! {REASON} (7x, +1.23 occlusion): KERNEL FATAL <*>" in text


def test_first_seen_line_follows_the_models_view_of_the_window() -> None:
    templates = ["a", "a", "b", "c", "c", "c", "d"]
    assert first_seen_line(templates, 10, "lines") == 0
    assert first_seen_line(templates, 3, "lines") == 4
    # runs taken once: the latest 3 runs are b, ccc, d: from line 2
    assert first_seen_line(templates, 3, "runs") == 2
    assert first_seen_line(templates, 2, "runs") == 3
    assert first_seen_line(templates, 4, "runs") == 0
    # counts: the latest 2 distinct messages by first appearance are c, d: from c's first line
    assert first_seen_line(templates, 2, "counts") == 3
    assert first_seen_line(templates, 4, "counts") == 0
