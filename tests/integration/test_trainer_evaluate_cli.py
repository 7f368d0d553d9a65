"""`logstream-train evaluate --model novelty` as a user runs it, on the shared BGL training sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
BGL_TRAIN = REPO.parent / "shared" / "data" / "BGL" / "BGL_train_sample.log"


def test_evaluate_baselines_on_the_bgl_sample(tmp_path: Path) -> None:
    if not BGL_TRAIN.exists():
        pytest.skip("shared BGL training sample not available")
    report = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "evaluate", "--model", "novelty", "--dataset", "bgl",
         "--logs", str(BGL_TRAIN), "--report", str(report), "--max-windows", "60"],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = orjson.loads(done.stdout.strip().splitlines()[-1])
    for key in ("precision", "recall", "f1", "tp", "fp", "fn", "tn", "windows", "anomalous_windows", "seconds"):
        assert key in summary
    assert summary["windows"] == 60 and 0 < summary["anomalous_windows"] < 60
    assert summary["tp"] + summary["fp"] + summary["fn"] + summary["tn"] == 60
    assert summary["detector"] == "novelty" and set(summary["baselines"]) == {"novelty", "count_vector", "tfidf"}
    assert summary["baselines"]["count_vector"]["f1"] > 0.3
    assert isinstance(summary["test_windows_in_train"], int)

    body = orjson.loads((report / "report.json").read_bytes())
    assert body["summary"]["f1"] == summary["f1"]
    assert body["data"]["train"]["windows"] == 60 and body["data"]["train"]["before_cap"]["windows"] == 513
    assert body["data"]["time"]["test_lines_older_than_train_end"] == 0
    markdown = (report / "report.md").read_text()
    assert "Verbatim overlap" in markdown and "count_vector" in markdown
    for name in ("confusion.png", "scores.png", "precision_recall.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in markdown
    assert len((report / "predictions.jsonl").read_bytes().splitlines()) == 60
    html = (report / "report.html").read_text()
    assert body["files"]["html"] == "report.html"
    assert html.count("data:image/png;base64,") == 3 and ".png\"" not in html  # plots inline, no file links
    assert "<table>" in html and "count_vector" in html


def test_evaluate_unlabelled_hdfs_with_assume_normal(tmp_path: Path) -> None:
    logs = REPO / "logstream" / "samples" / "HDFS_2k.log"
    command = [sys.executable, "-m", "trainer.cli", "evaluate", "--model", "novelty", "--dataset", "hdfs",
               "--logs", str(logs), "--report", str(tmp_path / "report")]
    unlabelled = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert unlabelled.returncode == 2 and "--assume-normal" in unlabelled.stderr.strip().splitlines()[-1]

    done = subprocess.run([*command, "--assume-normal"], capture_output=True, text=True, timeout=300, cwd=REPO,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert summary["anomalous_windows"] == 0 and summary["tp"] == summary["fn"] == 0
    assert summary["fp"] + summary["tn"] == summary["windows"] > 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "assumed normal" in markdown and "alarm rate" in markdown
    assert "assumed normal" in (tmp_path / "report" / "report.html").read_text()

    both = subprocess.run([*command, "--assume-normal", "--labels", str(logs)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
