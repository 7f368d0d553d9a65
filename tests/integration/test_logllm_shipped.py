"""The LogLLM artifacts shipped in logstream/samples/ load on the embedded models and judge real windows
with the threshold their fit chose on its validation share (samples/NOTICE.md has the commands).

A fixed small set of real windows per dataset: the first ten 100-line windows of the shipped BGL_2k
sample, and twelve HDFS block sessions of the shared HDFS train sample's test split (tests/data,
six anomalous and six normal). The verdicts must follow the stored threshold, the score must put
it at 50, and the artifact must separate the two classes on these windows.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from logstream.detectors.logllm import LogLLMDetector
from logstream.model import ARTIFACT_CONFIG
from logstream.records import Window
from logstream.settings import Settings
from tests.logllm_tools import SAMPLES, file_windows
from trainer.data import load_split
from trainer.metrics import average_precision

DATA = Path(__file__).resolve().parents[1] / "data"


def bgl_windows() -> tuple[list[Window], list[bool]]:
    windows = file_windows(SAMPLES / "BGL_2k.log", "bgl")[:10]
    return windows, [bool(w.label) for w in windows]


def hdfs_windows() -> tuple[list[Window], list[bool]]:
    sessions = load_split("hdfs", DATA / "HDFS_sessions.log", DATA / "HDFS_sessions_labels.csv").part("all")
    assert len(sessions) == 12 and sum(w.label for w in sessions) == 6
    return [w.window for w in sessions], [w.label for w in sessions]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "windows"), [("logllm-bgl", bgl_windows), ("logllm-hdfs", hdfs_windows)])
def test_the_shipped_artifact_scores_real_windows_with_its_stored_threshold(
    name: str, windows: object, model_cache_dir: Path,
) -> None:
    directory = SAMPLES / name
    config = orjson.loads((directory / ARTIFACT_CONFIG).read_bytes())
    decision = config["decision"]
    assert decision["source"] == "validation" and 0.0 < decision["threshold"] < 1.0
    assert (directory / "fit-summary.json").is_file()
    batch, labels = windows()  # type: ignore[operator]
    detector = LogLLMDetector.from_settings(Settings(detector="logllm", model=directory, cache_dir=model_cache_dir,
                                                     logllm_evidence="off"))
    try:
        assert detector.model.threshold == decision["threshold"]
        verdicts = detector.score(batch)
    finally:
        detector.close()
    assert all(v.anomalous == (v.score >= 50.0) for v in verdicts)  # the threshold sits at 50
    assert average_precision(labels, [v.score for v in verdicts]) >= 0.8, [(v.score, y) for v, y in
                                                                         zip(verdicts, labels)]
    assert any(v.anomalous for v, y in zip(verdicts, labels) if y)


@pytest.mark.slow
def test_the_hdfs_artifact_names_real_lines_as_evidence(model_cache_dir: Path) -> None:
    """Evidence of an artifact whose view is not the lines themselves (HDFS: `counts`, "<k> x <message>")
    names the window's masked messages, their first line and their count, never the view's text."""
    batch, labels = hdfs_windows()
    detector = LogLLMDetector.from_settings(Settings(detector="logllm", model=SAMPLES / "logllm-hdfs",
                                                     cache_dir=model_cache_dir, logllm_evidence="occlusion"))
    try:
        verdicts = detector.score([w for w, y in zip(batch, labels) if y])
    finally:
        detector.close()
    flagged = [(w, v) for w, v in zip([w for w, y in zip(batch, labels) if y], verdicts) if v.anomalous]
    assert flagged
    for window, verdict in flagged:
        assert verdict.evidence
        for item in verdict.evidence:
            assert item["template"] in window.templates
            assert window.lines[item["line"]].template == item["template"]
            assert item["count"] == window.templates.count(item["template"])
