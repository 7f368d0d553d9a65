"""The validation share of a fit, the decision threshold chosen on it (and its fallback), the calibrated score."""

from __future__ import annotations

import pytest

from logstream.model import (
    DEFAULT_THRESHOLD,
    ArtifactError,
    artifact_view,
    calibrated_score,
    check_threshold,
    model_view,
    view_template,
)
from logstream.records import LogLine, Window
from trainer.baselines import TfidfDetector
from trainer.data import LabeledWindow
from trainer.distinct import weighted_distinct
from trainer.validation import carve_validation, choose_threshold


def window(i: int, label: bool, key: str | None = None, text: str | None = None) -> LabeledWindow:
    line = LogLine("t", 0, i, raw=text or f"m{i}", template=text or f"m{i}", event_time=float(i))
    return LabeledWindow(Window("count", key or f"k{i}", "t", 0, [line], "size"), label)


def test_chronological_validation_is_the_latest_train_windows() -> None:
    train = [window(i, i % 5 == 0) for i in range(50)]
    fit, validation = carve_validation(train, 0.2, chronological=True, seed=1)
    assert fit == train[:40] and validation == train[40:]
    assert carve_validation(train, 0.0, chronological=True, seed=1) == (train, [])


def test_stratified_validation_holds_out_whole_keys_of_each_class_in_proportion() -> None:
    train = [window(i, i < 20, key=f"blk_{i // 2}") for i in range(200)]  # 100 blocks of 2 sessions, 10 anomalous
    fit, validation = carve_validation(train, 0.2, chronological=False, seed=3)
    assert len(fit) + len(validation) == len(train)
    held = {w.window.key for w in validation}
    assert not held & {w.window.key for w in fit}  # a block lies on one side only
    assert len({w.window.key for w in validation if w.label}) == 2  # 20 % of the 10 anomalous blocks
    assert len(held) == 20
    assert carve_validation(train, 0.2, chronological=False, seed=3) == (fit, validation)  # seeded


def test_the_threshold_is_the_best_validation_f1_with_a_margin() -> None:
    labels = [False, False, True, False, True, True]
    p = [0.01, 0.05, 0.30, 0.20, 0.60, 0.90]
    decision = choose_threshold(labels, p)
    assert decision.source == "validation" and decision.validation_f1 == 1.0
    assert 0.20 < decision.threshold <= 0.30  # every anomalous window at or above, every normal one below
    assert decision.threshold == pytest.approx(0.25)


@pytest.mark.parametrize(("labels", "missing"), [([False] * 5, "no anomalous window"), ([True] * 3, "no normal window"),
                                                  ([], "no validation windows")])
def test_a_validation_share_with_one_class_falls_back_to_the_llm_answer_and_says_why(labels: list[bool],
                                                                                     missing: str) -> None:
    decision = choose_threshold(labels, [0.9] * len(labels))
    assert decision.source == "fallback" and decision.threshold == DEFAULT_THRESHOLD == 0.5
    assert missing in decision.reason and "--validation-fraction" in decision.reason


def test_the_calibrated_score_puts_the_threshold_at_50_and_keeps_the_order() -> None:
    assert calibrated_score(0.02, 0.02) == pytest.approx(50.0)
    assert calibrated_score(0.3, 0.5) == pytest.approx(30.0)  # default threshold: 100 p
    scores = [calibrated_score(p, 0.1) for p in (0.0, 1e-9, 0.05, 0.1, 0.2, 0.99, 1.0)]
    assert scores == sorted(scores) and 0.0 <= scores[0] and scores[-1] <= 100.0
    for bad in (0.0, 1.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            check_threshold(bad)


def test_tfidf_baseline_learns_template_tokens() -> None:
    train = [window(i, i % 4 == 0, text="kernel fatal data tlb error <*>" if i % 4 == 0 else "ciod: login ok <*>")
             for i in range(40)]
    detector = TfidfDetector.fit(train)
    verdicts = detector.score([w.window for w in (window(100, True, text="data tlb error interrupt <*>"),
                                                  window(101, False, text="ciod: login ok again"))])
    assert [v.anomalous for v in verdicts] == [True, False]
    with pytest.raises(ValueError, match="one class"):
        TfidfDetector.fit([window(i, False) for i in range(5)])


def test_the_model_views_runs_and_counts_before_the_cap() -> None:
    messages = ["a", "a", "b", "a", "c", "c", "c"]
    assert model_view(messages, 128, "runs") == ["a", "b", "a", "c"]  # order kept, runs once
    assert model_view(messages, 2, "runs") == ["a", "c"]  # the latest runs
    assert model_view(messages, 3, "lines") == ["c", "c", "c"]
    # counts: each message once, by first appearance, with its lines in the whole window
    assert model_view(messages, 128, "counts") == ["3 x a", "1 x b", "3 x c"]
    assert model_view(messages, 2, "counts") == ["1 x b", "3 x c"]
    assert [view_template(e, "counts") for e in model_view(["x 1 x y", "x 1 x y"], 9, "counts")] == ["x 1 x y"]
    assert view_template("3 x a", "runs") == "3 x a"  # only the counts view writes counts
    with pytest.raises(ValueError, match="not an element of the counts view"):
        view_template("a", "counts")
    with pytest.raises(ValueError, match="choose one of lines, runs, counts"):
        model_view(messages, 9, "bag")  # type: ignore[arg-type]
    # an artifact written before views existed: its collapse_repeats flag names the view
    assert [artifact_view(c) for c in ({"collapse_repeats": True}, {"collapse_repeats": False}, {},
                                       {"view": "counts"})] == ["runs", "lines", "lines", "counts"]
    with pytest.raises(ArtifactError, match="unknown message view"):
        artifact_view({"view": "bag"})
    train = [window(i, False, text=t) for i, t in enumerate("aab")] + [window(9, True, text="z")]
    one = [LabeledWindow(Window("count", "k", "t", 0, [w.window.lines[0] for w in train[:3]], "size"), False),
           LabeledWindow(Window("count", "k2", "t", 0, [train[0].window.lines[0], train[2].window.lines[0]], "size"),
                         False), train[3]]
    distinct = weighted_distinct(one, 128, 0.3, view="runs")
    assert [(d.templates, d.count) for d in distinct] == [(("a", "b"), 2), (("z",), 1)]  # a a b == a b
    counted = weighted_distinct(one, 128, 0.3, view="counts")  # a a b != a b: counts differ
    assert [(d.templates, d.count) for d in counted] == [(("2 x a", "1 x b"), 1), (("1 x a", "1 x b"), 1),
                                                          (("1 x z",), 1)]
