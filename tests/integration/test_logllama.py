"""LogLLaMA end to end: fit-logllama on a real (small) dump, its data roles, evaluate, and `logstream run`.

One tiny model is trained per module on the shipped BGL sample (20-line count windows, a 64-wide
two-layer Llama, a few epochs: seconds on one core), then served against the embedded broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import orjson
import pytest
import structlog

from logstream.detectors.base import DetectorNotReady
from logstream.detectors.registry import load_detector
from logstream.logkeys import FIRST_TEMPLATE
from logstream.parsing import LineParser
from logstream.settings import Settings
from tests.kafkatools import GROUP_TIMINGS, SAMPLES, create_topic, produce_lines, read_alerts, unique
from trainer.cli import main as train_main
from trainer.data import load_split

REPO = Path(__file__).resolve().parents[2]
BGL = SAMPLES / "BGL_2k.log"
WINDOW = 20
SCHEMA = json.loads((REPO / "logstream/schemas/alert.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
TINY = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--layers", "2", "--context", "32",
        "--epochs-stage1", "6", "--epochs-stage2", "1", "--batch-size", "16", "--checkpoint-every", "10",
        "--threads", "1", "--window-size", str(WINDOW), "--log-level", "WARNING"]


@contextlib.contextmanager
def own_logging() -> Iterator[None]:
    """Run a command in-process; it reconfigures structlog onto this test's stderr, so put the session's back."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fit-logllama (both stages, evaluation included) on the BGL sample, as a user runs it."""
    output = tmp_path_factory.mktemp("logllama") / "model"
    with own_logging():
        code = train_main(["fit-logllama", "--dataset", "bgl", "--logs", str(BGL), "--output", str(output), *TINY])
    assert code == 0
    return output


def test_stage_one_never_sees_an_anomalous_window(artifact: Path) -> None:
    roles = orjson.loads((artifact / "checkpoints" / "data.json").read_bytes())
    split = load_split("bgl", BGL, window_size=WINDOW)
    label = {item.window.window_id: item.label for item in split.train}
    assert roles["dropped_anomalous"] > 0  # the sample has anomalous train windows: the check is not vacuous
    assert roles["stage_windows"] and all(label[w] is False for w in roles["stage_windows"])
    assert not set(roles["stage_windows"]) & set(roles["validation_windows"])
    dropped = {w for w, anomalous in label.items() if anomalous} - set(roles["validation_windows"])
    assert len(dropped) == roles["dropped_anomalous"]


def test_both_stages_are_recorded_and_the_report_shows_f1_before_and_after_stage_two(artifact: Path) -> None:
    summary = orjson.loads((artifact / "fit-summary.json").read_bytes())
    for stage in ("1", "2"):
        info = summary["stages"][stage]
        assert info["steps"] > 0 and info["seconds"] > 0 and 1 <= info["top_k"] <= summary["data"]["candidates"]
    assert summary["stages"]["1"]["loss_last"] < summary["stages"]["1"]["loss_first"]
    evaluation = summary["evaluation"]
    assert set(evaluation["compared"]) == {"logllama (stage 1)"} and set(evaluation["baselines"]) == {
        "novelty", "count_vector", "tfidf"}
    markdown = (artifact / "report" / "report.md").read_text()
    assert "| logllama | model |" in markdown and "| logllama (stage 1) | compared |" in markdown
    final = orjson.loads((artifact / "logllama.json").read_bytes())
    before = orjson.loads((artifact / "stage1" / "logllama.json").read_bytes())
    assert (final["kind"], final["stage"], before["kind"], before["stage"]) == ("logllama", "2", "logllama", "1")
    assert final["window"]["kind"] == "count" and final["decision"]["rule"] in ("f1", "alarm_rate")
    # test lines matching no frozen template: about half on this small fixture (BGL_2k's latest fifth holds
    # templates its first part never shows), never all of them
    assert 0.0 < final["coverage"]["unseen_share"] < 1.0


def test_the_detector_reports_its_templates_for_the_unseen_share_warning(artifact: Path) -> None:
    detector = load_detector(Settings(detector="logllama", model=artifact))
    coverage = detector.template_coverage()
    final = orjson.loads((artifact / "logllama.json").read_bytes())
    assert coverage.trained_unseen_share == final["coverage"]["unseen_share"] and "bgl" in coverage.dataset
    assert not coverage.known("a message no BGL node ever wrote")
    assert coverage.known(detector.keys.describe(FIRST_TEMPLATE))


def test_evaluate_command_scores_the_artifact_beside_the_baselines(artifact: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with own_logging():
        code = train_main(["evaluate", "--model", str(artifact), "--compare", str(artifact / "stage1"), "--dataset",
                           "bgl", "--logs", str(BGL), "--window-size", str(WINDOW), "--report", str(tmp_path)])
    assert code == 0
    summary = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["detector"] == "logllama" and summary["windows"] == 20 and summary["anomalous_windows"] == 8
    assert set(summary["compared"]) == {"logllama (stage1)"} and "count_vector" in summary["baselines"]
    assert summary["tp"] + summary["fp"] + summary["fn"] + summary["tn"] == 20


def test_a_missing_or_foreign_artifact_is_a_clear_start_up_error(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(DetectorNotReady, match="needs --model DIR"):
        load_detector(Settings(detector="logllama"))
    with pytest.raises(DetectorNotReady, match="not found"):
        load_detector(Settings(detector="logllama", model=tmp_path / "nothing"))
    with pytest.raises(DetectorNotReady, match="logllama.json is missing"):
        load_detector(Settings(detector="logllama", model=artifact / "checkpoints"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "logllama.json").write_bytes(orjson.dumps({"kind": "logllm"}))
    with pytest.raises(DetectorNotReady, match="not a LogLLaMA artifact"):
        load_detector(Settings(detector="logllama", model=foreign))


def injected_line(template_from: bytes) -> bytes:
    """A BGL line with the header of a real line and a message no training line has."""
    header = template_from.split(b" ")[:9]
    return b" ".join(header) + b" warp core breach detected in sector 7"


def test_logstream_run_publishes_alerts_naming_the_unexpected_lines(bootstrap: str, artifact: Path) -> None:
    lines = BGL.read_bytes().splitlines()[1600:]
    position = 2 * WINDOW + 5  # line 5 of the third window
    lines.insert(position, injected_line(lines[position]))
    lines = lines[: 6 * WINDOW]
    topic = unique("logllama")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, lines)
    alerts_topic = f"{topic}.alerts"
    done = subprocess.run(
        [sys.executable, "-m", "logstream.cli", "run", "--bootstrap-servers", bootstrap, "--input-topic", topic,
         "--alerts-topic", alerts_topic, "--dlq-topic", f"{topic}.dlq", "--group-id", f"{topic}.group",
         "--format", "bgl", "--window", "count", "--window-size", str(WINDOW), "--detector", "logllama",
         "--model", str(artifact), "--emit", "all", "--once",
         "--max-poll-interval-ms", str(GROUP_TIMINGS["max_poll_interval_ms"]),
         "--session-timeout-ms", str(GROUP_TIMINGS["session_timeout_ms"])],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alerts = sorted(read_alerts(bootstrap, alerts_topic), key=lambda a: a["source"]["first_offset"])
    assert [a["source"]["first_offset"] for a in alerts] == list(range(0, 6 * WINDOW, WINDOW))
    for alert in alerts:
        VALIDATOR.validate(alert)
        assert alert["detector"]["name"] == "logllama"
        assert (alert["verdict"]["label"] == "anomalous") == bool(alert["evidence"])
        assert (alert["verdict"]["score"] >= 50) == (alert["verdict"]["label"] == "anomalous")
        first = alert["source"]["first_offset"]
        for item in alert["evidence"]:
            raw = lines[first + item["line"]].decode()
            assert item["offset"] == first + item["line"]
            assert item["template"] == LineParser("bgl").parse(raw.encode(), topic=topic, partition=0,
                                                               offset=0, record_time=0.0).template
            assert item["reason"] in ("unseen_template", "unexpected_key")
        if alert["evidence"]:
            assert alert["sample_lines"][0]["offset"] == alert["evidence"][0]["offset"]  # evidence leads the sample
    breach = alerts[2]
    assert breach["verdict"]["label"] == "anomalous" and breach["verdict"]["score"] >= 95
    named = [item for item in breach["evidence"] if item["reason"] == "unseen_template"]
    assert any(item["offset"] == position and item["template"] == "warp core breach detected in sector <*>"
               and item["rank"] is None for item in named)
    assert any(sample["line"].endswith("warp core breach detected in sector 7") for sample in breach["sample_lines"])
