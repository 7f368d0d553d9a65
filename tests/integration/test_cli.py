"""The `logstream` command as a user runs it: flags, LOGSTREAM_* environment variables, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.kafkatools import SAMPLES, create_topic, produce_lines, read_alerts, unique


def logstream(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logstream.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_run_once_with_flags_and_environment(bootstrap: str) -> None:
    topic = unique("cli")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, (SAMPLES / "BGL_2k.log").read_bytes().splitlines()[:250])
    env = {"LOGSTREAM_WINDOW_SIZE": "50", "LOGSTREAM_EMIT": "all", "LOGSTREAM_MAX_POLL_INTERVAL_MS": "10000",
           "LOGSTREAM_SESSION_TIMEOUT_MS": "6000"}
    done = logstream("run", "--bootstrap-servers", bootstrap, "--input-topic", topic, "--alerts-topic",
                     f"{topic}.alerts", "--dlq-topic", f"{topic}.dlq", "--group-id", f"{topic}.g", "--format", "bgl",
                     "--window", "count", "--detector", "novelty", "--model", str(SAMPLES / "bgl-novelty.json"),
                     "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # alerts go to Kafka, logs to stderr: nothing on stdout
    events = [line for line in done.stderr.splitlines() if line.startswith("{")]
    assert any('"event":"pipeline_started"' in line for line in events)
    alerts = read_alerts(bootstrap, f"{topic}.alerts")
    assert len(alerts) == 5 and {a["window"]["size"] for a in alerts} == {50}
    assert {a["detector"]["name"] for a in alerts} == {"novelty"}


def test_clear_errors_on_bad_configuration(bootstrap: str) -> None:
    missing_model = logstream("run", "--bootstrap-servers", bootstrap, "--input-topic", "x", "--detector", "novelty")
    assert missing_model.returncode == 2 and "--model" in missing_model.stderr
    bad_stride = logstream("run", "--input-topic", "x", "--window-size", "10", "--window-stride", "20")
    assert bad_stride.returncode == 2 and "window_stride" in bad_stride.stderr
    no_topic = logstream("run", "--bootstrap-servers", bootstrap)
    assert no_topic.returncode == 2 and "--input-topic" in no_topic.stderr
    unknown = logstream("run", "--input-topic", "x", "--detector", "nope")
    assert unknown.returncode == 2 and "invalid choice: 'nope'" in unknown.stderr
