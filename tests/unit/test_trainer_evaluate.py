"""`logstream-train evaluate` in-process on the packaged samples: artifacts, baselines, report, JSON line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from logstream.detectors.base import DetectorNotReady
from logstream.detectors.novelty import NoveltyDetector
from logstream.files import iter_log_lines
from logstream.logs import configure_logging
from logstream.parsing import LineParser
from trainer.baselines import CountVectorDetector, normal_lines
from trainer.cli import main
from trainer.data import load_split
from trainer.evaluate import artifact_kind, evaluate

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The command configures logging onto the (captured) stderr of its test; put the suite's back after."""
    yield
    configure_logging(os.environ.get("LOGSTREAM_TEST_LOG_LEVEL", "WARNING"))


def test_artifact_kind_reads_the_json_config(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes(orjson.dumps({"model": {"type": "WordPiece"}}))
    (model / "logllm.json").write_bytes(orjson.dumps({"kind": "logllm", "prompt_version": 1}))
    assert artifact_kind(model) == "logllm"
    (model / "other.json").write_bytes(orjson.dumps({"kind": "logllama"}))
    with pytest.raises(DetectorNotReady, match="expected one JSON config"):
        artifact_kind(model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DetectorNotReady, match="found none"):
        artifact_kind(empty)
    novelty = tmp_path / "bgl-novelty.json"
    NoveltyDetector(["a"]).save(novelty)
    assert artifact_kind(novelty) == "novelty"
    with pytest.raises(DetectorNotReady, match="not found"):
        artifact_kind(tmp_path / "missing")


def test_novelty_baseline_learns_only_normal_lines() -> None:
    split = load_split("hdfs", SAMPLES / "HDFS_2k.log", SAMPLES / "anomaly_label_HDFS_2k.csv")
    normal_offsets = {line.offset for w in split.train if not w.label for line in w.window.lines}
    only_anomalous = {line.offset for w in split.train if w.label for line in w.window.lines} - normal_offsets
    learned = {line.offset for line in normal_lines(split.train)}
    assert learned == normal_offsets and only_anomalous  # HDFS: block labels only, so whole normal sessions
    bgl = load_split("bgl", SAMPLES / "BGL_2k.log")
    assert all(line.label is False for line in normal_lines(bgl.train))


def test_count_vector_needs_both_classes() -> None:
    split = load_split("bgl", SAMPLES / "BGL_2k.log")
    with pytest.raises(ValueError, match="one class"):
        CountVectorDetector.fit([w for w in split.train if not w.label])
    detector = CountVectorDetector.fit(split.train)
    verdicts = detector.score([w.window for w in split.test])
    assert len(verdicts) == len(split.test) and all(0 <= v.score <= 100 for v in verdicts)
    assert all(v.anomalous == (v.score >= 50) for v in verdicts)


def test_evaluate_a_novelty_artifact_beside_the_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "novelty.json"
    NoveltyDetector.fit(iter_log_lines(SAMPLES / "BGL_2k.log", LineParser("bgl"))).save(model)
    report = tmp_path / "report"
    rc = main(["evaluate", "--model", str(model), "--dataset", "bgl", "--logs", str(SAMPLES / "BGL_2k.log"),
               "--report", str(report), "--batch-size", "3", "--window-size", "50"])
    assert rc == 0
    summary = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["detector"] == "novelty (model)" and summary["split"] == "test"
    assert summary["windows"] == 8  # 400 test lines in windows of 50
    assert summary["tp"] + summary["fp"] + summary["fn"] + summary["tn"] == summary["windows"]
    assert set(summary["baselines"]) == {"novelty", "count_vector", "tfidf"}
    body = orjson.loads((report / "report.json").read_bytes())
    assert [d["name"] for d in body["detectors"]] == ["novelty (model)", "novelty", "count_vector", "tfidf"]
    assert body["context"]["batch_size"] == 3
    rows = [orjson.loads(line) for line in (report / "predictions.jsonl").read_bytes().splitlines()]
    assert len(rows) == 8 and set(rows[0]["verdicts"]) == {"novelty (model)", "novelty", "count_vector", "tfidf"}


def test_evaluate_all_windows_and_a_single_class_train_split(tmp_path: Path) -> None:
    split = load_split("bgl", SAMPLES / "BGL_2k.log")
    split.train = [w for w in split.train if not w.label]  # no anomalies to learn from
    summary = evaluate(split, tmp_path, part="all", progress=False)
    assert summary["windows"] == len(split.train) + len(split.test)
    assert "one class" in summary["baselines"]["count_vector"]["skipped"]
    assert "one class" in summary["baselines"]["tfidf"]["skipped"]
    assert "partly in-sample" in (tmp_path / "report.md").read_text()


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    base = ["evaluate", "--dataset", "hdfs", "--logs", str(SAMPLES / "HDFS_2k.log"), "--report", str(tmp_path / "r")]
    assert main([*base, "--model", str(empty)]) == 2
    assert "JSON config" in capsys.readouterr().err
    assert main([*base, "--model", "novelty"]) == 2  # HDFS without block labels
    assert "label file" in capsys.readouterr().err
    assert main([*base, "--model", "novelty", "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_headline_puts_the_baselines_beside_the_detector() -> None:
    from trainer.report import headline

    line = headline({"detector": "logllm", "split": "test", "f1": 0.931034, "precision": 0.870968, "recall": 1.0,
                     "average_precision": float("nan"), "windows": 1145, "anomalous_windows": 27,
                     "baselines": {"count_vector": {"f1": 0.931034}, "tfidf": {"f1": 0.5}}, "report": "r/report.md"})
    assert line == ("logllm: F1 0.931 (P 0.871, R 1.000, AP –) on 1145 test windows (27 anomalous); "
                    "baselines F1: count_vector 0.931, tfidf 0.500; report: r/report.md")
