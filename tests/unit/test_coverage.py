"""The unseen-template share: what an artifact records at training time and the serving-side warning."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from logstream.coverage import CoverageMonitor, TemplateCoverage, TrainingCoverage, alarm_share
from logstream.detectors.novelty import NoveltyDetector
from logstream.files import iter_log_lines
from logstream.logs import configure_logging
from logstream.parsing import LineParser
from logstream.records import Window

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"


def windows_of(path: Path, fmt: str, size: int = 100) -> list[Window]:
    lines = list(iter_log_lines(path, LineParser(fmt)))
    return [Window("count", "t/0", "t", 0, lines[i:i + size], "size") for i in range(0, len(lines) - size + 1, size)]


def test_alarm_share_is_three_quarters_of_the_way_from_training_to_everything_new() -> None:
    assert alarm_share(0.0) == pytest.approx(0.75)
    assert alarm_share(0.2) == pytest.approx(0.8)
    assert 0.9 < alarm_share(0.9) < 1.0


def test_training_coverage_measured_on_held_out_lines_and_on_the_tail_of_a_stream() -> None:
    measured = TrainingCoverage.measure("d", ["a", "b", "a"], ["a", "c", "c", "b"])
    assert measured.templates == frozenset({"a", "b"}) and measured.unseen_share == 0.5
    # ten lines: the latest two (20 %) are x (new there) and a (seen before): one new of two
    streamed = TrainingCoverage.from_stream("d", ["a", "b", "a", "b", "a", "b", "a", "b", "x", "a"])
    assert streamed.unseen_share == 0.5 and streamed.templates == frozenset({"a", "b", "x"})
    assert TrainingCoverage.from_json(orjson.loads(orjson.dumps(measured.to_json()))) == measured
    assert TrainingCoverage.from_json(None) is None


def test_novelty_fit_records_the_unseen_share_and_loads_it_back(tmp_path: Path) -> None:
    lines = iter_log_lines(SAMPLES / "BGL_2k.log", LineParser("bgl"))
    fitted = NoveltyDetector.fit(lines, source="BGL_2k.log")
    assert fitted.unseen_share is not None and 0.0 < fitted.unseen_share < 0.5
    fitted.save(tmp_path / "m.json")
    loaded = NoveltyDetector.load(tmp_path / "m.json")
    assert loaded.unseen_share == fitted.unseen_share
    coverage = loaded.template_coverage()
    assert coverage.dataset == "BGL_2k.log" and coverage.trained_unseen_share == fitted.unseen_share


def test_a_bgl_model_on_hdfs_traffic_warns_once_naming_its_dataset() -> None:
    detector = NoveltyDetector.load(SAMPLES / "bgl-novelty.json")
    shares: list[tuple[float, float, float]] = []
    warnings: list[int] = []
    monitor = CoverageMonitor.for_detector(detector, recent_lines=1000, on_share=lambda *f: shares.append(f),
                                           on_warning=lambda: warnings.append(1))
    assert monitor is not None
    with capture_logs() as logs:
        for window in windows_of(SAMPLES / "BGL_2k.log", "bgl"):  # what it was fitted on: quiet
            monitor.observe([window])
        assert not warnings and shares[-1][0] < shares[-1][2]
        for window in windows_of(SAMPLES / "HDFS_2k.log", "generic"):  # application logs it never saw
            monitor.observe([window])
    assert warnings == [1]  # rate-limited: one warning while it stays high
    warned = [entry for entry in logs if entry["event"] == "unseen_templates_high"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["dataset"] == detector.source and "BGL" in warned[0]["dataset"]
    assert warned[0]["unseen_share"] > warned[0]["alarm_share"] and warned[0]["examples"]
    assert shares[-1][0] > 0.9  # once the BGL lines have left the measured span: nearly every line is new


@pytest.fixture
def info_logs() -> Iterator[None]:
    configure_logging("INFO")
    yield
    configure_logging(os.environ.get("LOGSTREAM_TEST_LOG_LEVEL", "WARNING"))  # as tests/conftest.py sets it


def test_the_share_recovers_and_says_so(info_logs: None) -> None:
    monitor = CoverageMonitor("d", TemplateCoverage("set", {"ok"}.__contains__, 0.0), recent_lines=200,
                              min_lines=100)
    ok = Window("count", "t/0", "t", 0, list(iter_log_lines(SAMPLES / "BGL_2k.log", LineParser("bgl")))[:100], "size")
    with capture_logs() as logs:
        monitor.observe([ok, ok])  # every template unknown
        assert monitor.high
        known = TemplateCoverage("set", lambda _template: True, 0.0)
        monitor.coverage = known
        monitor._known_cache.clear()
        monitor.observe([ok, ok, ok])
    assert not monitor.high
    assert [e["event"] for e in logs] == ["unseen_templates_high", "unseen_templates_normal"]


def test_detectors_without_coverage_get_no_monitor() -> None:
    from logstream.detectors.null import NullDetector

    assert CoverageMonitor.for_detector(NullDetector()) is None


def test_the_shipped_logllm_artifact_records_its_coverage_and_the_demo_sample_fits_it() -> None:
    config = orjson.loads((SAMPLES / "logllm-bgl" / "logllm.json").read_bytes())
    coverage = TrainingCoverage.from_json(config["coverage"])
    assert coverage is not None and coverage.unseen_share is not None and 0 < coverage.unseen_share < 0.5
    assert "BGL" in coverage.dataset
    monitor = CoverageMonitor("logllm", TemplateCoverage.of(coverage), recent_lines=2000)
    with capture_logs() as logs:
        for window in windows_of(SAMPLES / "BGL_2k.log", "bgl"):
            monitor.observe([window])
        for window in windows_of(SAMPLES / "HDFS_2k.log", "generic"):
            monitor.observe([window])
    assert [entry["event"] for entry in logs] == ["unseen_templates_high"]  # only once the HDFS lines dominate
