"""The consumer's lifecycle against the real broker: unreachable brokers, missing topics, partitions
that never come, a wrong --format, the --once summary, a topic created after the consumer started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from logstream.broker import EmbeddedBroker, free_port
from logstream.kafka import TopicMissing
from logstream.metrics import Metrics
from tests.kafkatools import (
    GROUP_TIMINGS,
    SAMPLES,
    BackgroundPipeline,
    create_topic,
    make_settings,
    produce_lines,
    read_alerts,
    run_once,
    unique,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
BGL = (SAMPLES / "BGL_2k.log").read_bytes().splitlines()
TIMINGS = ["--max-poll-interval-ms", str(GROUP_TIMINGS["max_poll_interval_ms"]),
           "--session-timeout-ms", str(GROUP_TIMINGS["session_timeout_ms"])]
# generic application logs: not one of them is a BGL line
APP_LOGS = [f"2026-11-30T09:02:{i % 60:02d}Z web-frontend request {i} served in {i % 7} ms".encode()
            for i in range(300)]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "logstream.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def events(stderr: str) -> list[dict]:
    return [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def plain_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def run_args(bootstrap: str, topic: str, *extra: str) -> list[str]:
    return ["run", "--bootstrap-servers", bootstrap, "--input-topic", topic, "--alerts-topic", f"{topic}.alerts",
            "--dlq-topic", f"{topic}.dlq", "--group-id", f"{topic}.g", "--detector", "null", *TIMINGS, *extra]


# --- unreachable broker -----------------------------------------------------------------------------


def test_each_command_exits_nonzero_within_30s_naming_an_unreachable_broker(tmp_path: Path) -> None:
    """Nothing listens on the port: one line naming the address and the reason, exit 1, well within 30 s."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "app.log"
    log.write_bytes(b"\n".join(APP_LOGS[:10]) + b"\n")
    commands = {
        "run": command(*run_args(address, "logs")),
        "run --once": command(*run_args(address, "logs", "--once")),
        "produce": command("produce", "--bootstrap-servers", address, "--topic", "logs", "--file", str(log)),
        "alerts": command("alerts", "--bootstrap-servers", address),
        "alerts --idle-exit": command("alerts", "--bootstrap-servers", address, "--idle-exit", "1"),
        "dlq": command("dlq", "--bootstrap-servers", address),
        "repartition": command("repartition", "--bootstrap-servers", address, "--input-topic", "logs",
                               "--repartition-topic", "logs.by-block"),
    }
    started = time.monotonic()
    running = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
               for name, argv in commands.items()}  # the default connect timeout (20 s), in parallel
    for name, process in running.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 1, (name, err)
        assert time.monotonic() - started < 30, name
        assert "Traceback" not in err, (name, err)
        lines = plain_lines(err)
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith(f"logstream {name.split()[0]}: cannot reach Kafka at {address} within 20 s: ")
        assert "Connection refused" in lines[0], lines[0]
        assert len(events(err)) <= 3, ("librdkafka's retries are not logged line by line", name, err)


def test_alerts_idle_exit_fails_when_the_broker_went_away(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path / "broker").start()
    try:
        tail = subprocess.Popen(command("alerts", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
                                        unique("quiet"), "--idle-exit", "8"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        time.sleep(4)  # connected and following
        broker.stop()
        _, err = tail.communicate(timeout=60)
    finally:
        broker.close()
    assert tail.returncode == 1, err
    assert f"cannot reach Kafka at {broker.bootstrap_servers}" in plain_lines(err)[-1]
    assert len(events(err)) <= 4, err  # librdkafka's reconnect storm, rate-limited


# --- missing topics and partitions that never come -------------------------------------------------------


def test_run_once_on_a_missing_topic_names_it_and_exits_2(bootstrap: str) -> None:
    topic = unique("present")
    create_topic(bootstrap, topic)
    started = time.monotonic()
    done = subprocess.run(command(*run_args(bootstrap, topic + "x", "--once")), capture_output=True, text=True,
                          env=env(), timeout=60)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    assert plain_lines(done.stderr) == [
        f"logstream run: input topic '{topic}x' - did you mean '{topic}'? not found on {bootstrap}"]
    with pytest.raises(TopicMissing):
        run_once(make_settings(bootstrap, unique("absent")))


def test_repartition_once_on_a_missing_topic_exits_2(bootstrap: str) -> None:
    topic = unique("nosuch")
    done = subprocess.run(command("repartition", "--bootstrap-servers", bootstrap, "--input-topic", topic,
                                  "--repartition-topic", f"{topic}.by-block", "--group-id", f"{topic}.r", "--once",
                                  *TIMINGS), capture_output=True, text=True, env=env(), timeout=60)
    assert done.returncode == 2, done.stderr
    assert plain_lines(done.stderr) == [f"logstream repartition: input topic '{topic}' not found on {bootstrap}"]


def test_run_once_fails_when_its_topic_is_never_assigned_to_it(bootstrap: str) -> None:
    """Another member holds the topic's only partition: the batch run says who, and exits 1."""
    topic = unique("held")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, BGL[:100])
    holder = BackgroundPipeline(make_settings(bootstrap, topic, format="bgl", group_id=f"{topic}.g",
                                              group_instance_id="holder")).start()
    try:
        assert wait_for(lambda: len(read_alerts(bootstrap, f"{topic}.alerts", idle_s=0.2)) >= 1, 60)
        started = time.monotonic()
        done = subprocess.run(command(*run_args(bootstrap, topic, "--once", "--format", "bgl",
                                                "--assignment-timeout-s", "10", "--group-instance-id", "batch")),
                              capture_output=True, text=True, env=env(), timeout=90)
        elapsed = time.monotonic() - started
    finally:
        assert holder.stop() == 0
    assert done.returncode == 1, done.stderr
    assert elapsed < 40
    (line,) = plain_lines(done.stderr)
    assert line.startswith(f"logstream run: no partition of {topic} was assigned to this member of group "
                           f"'{topic}.g' within 1"), line
    assert "holder on" in line and f"{topic}/0" in line, line


def test_restart_after_sigkill_without_static_id_says_what_to_do(bootstrap: str, tmp_path: Path) -> None:
    """The embedded broker never expires a killed dynamic member: the restart explains, instead of hanging."""
    topic = unique("killed")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, BGL[:300])
    args = run_args(bootstrap, topic, "--format", "bgl", "--emit", "all", "--window-size", "50",
                    "--assignment-timeout-s", "8", "--metrics-port", str(free_port()))
    log = tmp_path / "run.log"
    first = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env())
    assert wait_for(lambda: len(read_alerts(bootstrap, f"{topic}.alerts", idle_s=0.2)) >= 6, 60)
    first.send_signal(signal.SIGKILL)
    first.wait()

    restart_log = tmp_path / "restart.log"
    port = free_port()
    restart = subprocess.Popen(command(*args[:-1], str(port)), stdout=subprocess.DEVNULL,
                               stderr=restart_log.open("wb"), env=env())
    try:
        assert wait_for(lambda: '"no_partitions_assigned"' in restart_log.read_text(), 40), restart_log.read_text()
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert "--group-instance-id" in not_ready.value.read().decode()
    finally:
        restart.send_signal(signal.SIGTERM)
        assert restart.wait(60) == 0, restart_log.read_text()[-2000:]
    (event,) = [e for e in events(restart_log.read_text()) if e["event"] == "no_partitions_assigned"]
    assert "--group-instance-id" in event["reason"] and "do not rejoin" in event["reason"], event
    assert event["group"] == f"{topic}.g"


def test_exactly_once_restarts_after_sigkill_as_the_same_member(bootstrap: str, tmp_path: Path) -> None:
    """Exactly-once uses the host name as static member id by default: a killed instance gets its partitions back."""
    topic = unique("eoskill")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, BGL[:300])
    args = run_args(bootstrap, topic, "--format", "bgl", "--emit", "all", "--window-size", "50", "--guarantee",
                    "exactly-once", "--commit-interval-s", "0.5")
    first = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    assert wait_for(lambda: len(read_alerts(bootstrap, f"{topic}.alerts", idle_s=0.2)) >= 6, 60)
    first.send_signal(signal.SIGKILL)
    first.wait()

    produce_lines(bootstrap, topic, BGL[300:600])
    started = time.monotonic()
    done = subprocess.run(command(*args, "--once"), capture_output=True, text=True, env=env(), timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert len({a["alert_id"] for a in read_alerts(bootstrap, f"{topic}.alerts")}) == 12


# --- a topic created after the consumer started ----------------------------------------------------------


def test_topic_created_after_the_consumer_started_is_consumed_within_10s(bootstrap: str) -> None:
    topic = unique("late-topic")
    settings = make_settings(bootstrap, topic, format="bgl", window_size=50)
    running = BackgroundPipeline(settings).start()
    try:
        time.sleep(4)  # subscribed to a topic that does not exist yet
        create_topic(bootstrap, topic)
        produce_lines(bootstrap, topic, BGL[:100])
        created = time.monotonic()
        assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.1, timeout_s=5)) == 2,
                        timeout=10, interval=0.2)
        assert time.monotonic() - created < 10
    finally:
        assert running.stop() == 0


# --- a wrong --format, and the --once summary ------------------------------------------------------------


def test_wrong_format_warns_and_once_ends_with_one_summary_line(bootstrap: str) -> None:
    topic = unique("wrongfmt")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, APP_LOGS)
    done = subprocess.run(command(*run_args(bootstrap, topic, "--once", "--format", "bgl")), capture_output=True,
                          text=True, env=env(), timeout=90)
    assert done.returncode == 0, done.stderr
    logged = events(done.stderr)
    (warning,) = [e for e in logged if e["event"] == "most_records_dead_lettered"]
    assert warning["format"] == "bgl" and warning["share"] == 1.0 and warning["partition"] == f"{topic}/0"
    assert warning["example"]["reason"] == "unparseable" and warning["example"]["offset"] == 0
    assert warning["example"]["detail"], "one example reason"
    (summary,) = [e for e in logged if e["event"] == "run_summary"]
    assert summary["records_read"] == 300 and summary["records_parsed"] == 0
    assert summary["dead_lettered"] == {"unparseable": 300}
    assert summary["windows_closed"] == 0 and summary["verdicts"] == {} and summary["alerts"] == {}


def test_right_format_summary_and_dead_letter_ratio(bootstrap: str) -> None:
    topic = unique("rightfmt")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, [*BGL[:250], b"not a BGL line"])
    metrics = Metrics()
    settings = make_settings(bootstrap, topic, format="bgl", window_size=100, emit="anomalous")
    assert run_once(settings, metrics) == 0
    summary = metrics.summary()
    assert summary["records_read"] == 251 and summary["records_parsed"] == 250
    assert summary["dead_lettered"] == {"unparseable": 1}
    assert summary["windows_closed"] == 3 and summary["verdicts"] == {"normal": 3} and summary["alerts"] == {}

    # while a partition is owned, its share of dead letters is a gauge an alert rule can watch
    running = BackgroundPipeline(make_settings(bootstrap, topic, format="bgl", group_id=unique("ratio"))).start()
    try:
        assert wait_for(lambda: dead_letter_ratio(running.metrics) is not None, timeout=30)
        assert dead_letter_ratio(running.metrics) == pytest.approx(1 / 251)
    finally:
        assert running.stop() == 0


def dead_letter_ratio(metrics: Metrics) -> float | None:
    samples = [s.value for m in metrics.dead_letter_ratio.collect() for s in m.samples]
    return samples[0] if samples else None


def test_a_broker_whose_picked_port_was_taken_starts_on_another(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of parallel test workers: a port picked as free is bound by someone else before the
    broker binds it. The first start moves to a new port, even when the broker takes its time to fail
    (the other broker's answer is not taken for its own); a restart keeps its port (clients' address)."""
    import logstream.broker as broker_module

    real = broker_module.broker_binary()
    slow = tmp_path / "slow-broker"
    slow.write_text(f'#!/bin/sh\nsleep 0.6\nexec "{real}" "$@"\n')
    slow.chmod(0o755)
    with EmbeddedBroker(data_dir=tmp_path / "first") as first:
        monkeypatch.setattr(broker_module, "broker_binary", lambda: slow)
        second = EmbeddedBroker(data_dir=tmp_path / "second")
        second.port = first.port  # as if both had picked the same port
        try:
            second.start()
            assert second.running and second.port != first.port
            taken = second.port
            second.stop()
            second.start()
            assert second.port == taken and second.running
        finally:
            second.close()
