"""The `logstream` command as a user runs it: flags, LOGSTREAM_* environment variables, exit codes."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import orjson

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


def one_line(done: subprocess.CompletedProcess) -> str:
    """The whole stderr of a refused command: exactly one line, no traceback."""
    text = done.stderr.strip()
    assert "\n" not in text and "Traceback" not in text, done.stderr
    return text


def test_operator_mistakes_are_one_line_and_exit_2(bootstrap: str, tmp_path) -> None:
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("")
    base = ["run", "--bootstrap-servers", bootstrap, "--input-topic", "x"]
    cases = {
        "no detector": (base, {}, "choose a detector with --detector"),
        "unknown detector": ([*base, "--detector", "nosuch"], {}, "invalid choice: 'nosuch'"),
        "unknown detector (env)": (base, {"LOGSTREAM_DETECTOR": "nosuch"}, "detector"),
        "novelty model is a directory": ([*base, "--detector", "novelty", "--model", str(tmp_path)], {},
                                         "is a directory"),
        "invalid cache dir": (["models", "prepare", "--cache-dir", str(a_file / "cache")], {}, "cache directory"),
        "invalid HOME": (["models", "prepare"], {"HOME": str(a_file)}, "LOGSTREAM_CACHE_DIR"),
        "LogLLM on an invalid cache dir": ([*base, "--detector", "logllm", "--model", str(SAMPLES / "logllm-bgl"),
                                           "--cache-dir", str(a_file / "cache")], {}, "cache directory"),
        "missing input file": (["novelty", "fit", "--format", "bgl", "--input", str(tmp_path / "none.log"),
                                "--output", str(tmp_path / "m.json")], {}, "no such file"),
        "output path is a directory": (["novelty", "fit", "--format", "bgl", "--input", str(SAMPLES / "BGL_2k.log"),
                                        "--output", str(tmp_path)], {}, "Is a directory"),
        "produce a directory": (["produce", "--bootstrap-servers", bootstrap, "--topic", "t", "--file",
                                 str(tmp_path)], {}, "is a directory"),
    }
    for name, (argv, env, expected) in cases.items():
        done = logstream(*argv, env=env)
        assert done.returncode == 2, (name, done.stderr)
        assert expected in one_line(done), name


def test_dead_letters_are_readable_and_alerts_refuses_them(bootstrap: str) -> None:
    topic = unique("dlq")
    create_topic(bootstrap, topic)
    bad = [b"\xff\xfe not utf-8", b"this is not a BGL line"]
    produce_lines(bootstrap, topic, [*(SAMPLES / "BGL_2k.log").read_bytes().splitlines()[:50], *bad])
    done = logstream("run", "--bootstrap-servers", bootstrap, "--input-topic", topic, "--alerts-topic",
                     f"{topic}.alerts", "--dlq-topic", f"{topic}.dlq", "--group-id", f"{topic}.g", "--format", "bgl",
                     "--detector", "null", "--emit", "all", "--once", "--max-poll-interval-ms", "10000",
                     "--session-timeout-ms", "6000")
    assert done.returncode == 0, done.stderr

    wrong = logstream("alerts", "--bootstrap-servers", bootstrap, "--topic", f"{topic}.dlq", "--from-beginning",
                      "--idle-exit", "3")
    assert wrong.returncode == 2 and f"logstream dlq --topic {topic}.dlq" in one_line(wrong)
    not_dlq = logstream("dlq", "--bootstrap-servers", bootstrap, "--topic", f"{topic}.alerts", "--from-beginning",
                        "--idle-exit", "3")
    assert not_dlq.returncode == 2 and "not a dead-letter record" in one_line(not_dlq)

    shown = logstream("dlq", "--bootstrap-servers", bootstrap, "--topic", f"{topic}.dlq", "--from-beginning",
                      "--idle-exit", "3")
    assert shown.returncode == 0, shown.stderr
    assert f"[undecodable] {topic}/0 offset 50" in shown.stdout and "\\xff\\xfe not utf-8" in shown.stdout
    assert f"[unparseable] {topic}/0 offset 51" in shown.stdout and "this is not a BGL line" in shown.stdout
    as_json = logstream("dlq", "--bootstrap-servers", bootstrap, "--topic", f"{topic}.dlq", "--from-beginning",
                        "--idle-exit", "3", "--json")
    records = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["reason"], r["source"]["offset"]) for r in records] == [("undecodable", 50), ("unparseable", 51)]
    assert [base64.b64decode(r["original_base64"]) for r in records] == bad
    assert records[0]["original"] is None and records[1]["original"] == bad[1].decode()
    assert all(r["detail"] for r in records)


def test_following_a_topic_that_does_not_exist_says_so(bootstrap: str) -> None:
    """`alerts --idle-exit` on a missing topic: not "0 alerts" and exit 0, but the missing topic, exit 2."""
    topic = unique("no-such-alerts")
    done = logstream("alerts", "--bootstrap-servers", bootstrap, "--topic", topic, "--idle-exit", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"logstream alerts: alerts topic {topic!r} not found on {bootstrap}"
    assert '"event":"topic_missing"' in done.stderr  # said at start too: it waits for the topic until the idle exit
