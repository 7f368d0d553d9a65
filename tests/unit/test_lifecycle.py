"""Lifecycle helpers without a broker: the assignment watch and its explanations, dead-letter shares,
the run summary, and the rate limit on librdkafka's own log lines."""

from __future__ import annotations

import io
import logging
import os
from contextlib import redirect_stderr

import orjson
import pytest

from logstream.assignment import AssignmentWatch, explain
from logstream.deadletters import MIN_RECORDS, DeadLetterWatch
from logstream.kafka import GroupView, TopicMissing, require_topics
from logstream.logs import _StructlogHandler, configure_logging
from logstream.metrics import Health, Metrics
from logstream.settings import Settings


def captured(fn) -> list[dict]:  # noqa: ANN001
    """The JSON log events `fn` writes (structlog renders to stderr)."""
    buffer = io.StringIO()
    try:
        with redirect_stderr(buffer):
            configure_logging("INFO")
            fn()
    finally:
        configure_logging(os.environ.get("LOGSTREAM_TEST_LOG_LEVEL", "WARNING"))
    return [orjson.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


# --- assignment ---------------------------------------------------------------------------------


def test_assignment_watch_reports_once_per_timeout_until_partitions_come() -> None:
    watch = AssignmentWatch(["a", "b"], timeout_s=10, now=0.0)
    assert not watch.overdue(once=False, now=9.9)
    assert watch.overdue(once=False, now=10.0)
    assert not watch.overdue(once=False, now=15.0), "at most once per timeout"
    assert watch.overdue(once=False, now=20.0)
    watch.on_assign([])  # the group answered with nothing: a running consumer may legitimately idle
    assert not watch.waiting(once=False) and not watch.overdue(once=False, now=100.0)
    assert watch.waiting(once=True) and watch.unassigned == ["a", "b"]
    watch.on_assign(["a"])
    assert watch.unassigned == ["b"] and watch.overdue(once=True, now=100.0)
    watch.on_assign(["b"])
    assert not watch.waiting(once=True) and not watch.overdue(once=True, now=1000.0)


def test_explain_names_the_stuck_dynamic_member_and_static_membership() -> None:
    view = GroupView("COMPLETING_REBALANCING", [("me", None, "/10.0.0.1", []), ("dead-1", None, "/10.0.0.2", [])])
    text = explain("g", view, "me", ["logs"], rebalanced=False)
    assert "dead-1 from /10.0.0.2" in text and "--group-instance-id" in text and "'g'" in text
    assert "me from" not in text


def test_explain_names_a_static_member_that_holds_up_the_rebalance() -> None:
    view = GroupView("PREPARING_REBALANCING", [("me", None, "/h1", []), ("m2", "replica-1", "/h2", ["logs/0"])])
    text = explain("g", view, "me", ["logs"], rebalanced=False)
    assert "replica-1 on /h2 holding logs/0" in text and "restarted with its own id (replica-1)" in text


def test_explain_names_the_members_holding_the_partitions() -> None:
    view = GroupView("STABLE", [("me", None, "/h1", []), ("m2", "replica-0", "/h2", ["logs/0", "logs/1"])])
    text = explain("g", view, "me", ["logs"], rebalanced=True)
    assert "replica-0 on /h2 holding logs/0, logs/1" in text and "--group-id" in text
    assert "did not describe" in explain("g", None, "me", ["logs"], rebalanced=True)


def test_exactly_once_defaults_to_a_static_member_id_per_host() -> None:
    assert Settings().static_member_id is None
    eos = Settings(guarantee="exactly-once")
    assert eos.static_member_id and eos.transactional_id == f"{eos.group_id}.{eos.static_member_id}"
    assert Settings(guarantee="exactly-once", group_instance_id="r-1").static_member_id == "r-1"
    assert Settings(session_timeout_ms=6000).effective_assignment_timeout_s == 36.0
    assert Settings(assignment_timeout_s=5).effective_assignment_timeout_s == 5.0


def test_readiness_says_why_no_partition_came() -> None:
    health = Health(last_poll=1e12)
    assert health.ready() == (False, "no partitions assigned")
    health.waiting_for = "group 'g' waits for a dead member"
    assert health.ready() == (False, "no partitions assigned: group 'g' waits for a dead member")


# --- topics --------------------------------------------------------------------------------------


class _Meta:
    def __init__(self, names: list[str]) -> None:
        self.topics = {name: type("T", (), {"error": None})() for name in names}


def test_missing_input_topics_are_named_with_near_names() -> None:
    require_topics(_Meta(["logs.raw"]), ["logs.raw"], "k:9092")
    with pytest.raises(TopicMissing) as caught:
        require_topics(_Meta(["logs.raw", "__consumer_offsets"]), ["logs.raww", "zzz"], "k:9092")
    message = str(caught.value)
    assert "'logs.raww' - did you mean 'logs.raw'?" in message and "'zzz'" in message and "k:9092" in message
    assert caught.value.exit_code == 2


# --- dead-letter share ------------------------------------------------------------------------------


def ratio(metrics: Metrics, topic: str, partition: int) -> float | None:
    for metric in metrics.dead_letter_ratio.collect():
        for sample in metric.samples:
            if sample.labels == {"topic": topic, "partition": str(partition)}:
                return sample.value
    return None


def test_dead_letter_share_warns_once_naming_format_reason_and_example() -> None:
    metrics = Metrics()
    watch = DeadLetterWatch(metrics, "bgl", "count")

    def feed() -> None:
        for _ in range(3):
            watch.read(("t", 0), MIN_RECORDS)
            for offset in range(MIN_RECORDS - 5):
                watch.dead(("t", 0), "unparseable", f"not a BGL line #{offset}", offset)
            watch.read(("t", 1), MIN_RECORDS)  # a healthy partition next to it
            watch.evaluate()

    events = [e for e in captured(feed) if e["event"] == "most_records_dead_lettered"]
    assert len(events) == 1, "rate-limited: one warning per partition per minute"
    event = events[0]
    assert event["partition"] == "t/0" and event["format"] == "bgl" and event["share"] == 0.95
    assert event["example"] == {"reason": "unparseable", "detail": "not a BGL line #0", "offset": 0}
    assert "--format bgl" in event["hint"]
    assert ratio(metrics, "t", 0) == 0.95 and ratio(metrics, "t", 1) == 0.0


def test_dead_letter_share_waits_for_enough_records_except_at_the_end() -> None:
    metrics = Metrics()
    watch = DeadLetterWatch(metrics, "hdfs", "session")
    watch.read(("t", 0), 4)
    for offset in range(4):
        watch.dead(("t", 0), "unkeyed", "no block id in line", offset)
    watch.evaluate()
    assert ratio(metrics, "t", 0) is None
    events = captured(lambda: watch.evaluate(final=True))
    assert ratio(metrics, "t", 0) == 1.0
    assert [e["hint"] for e in events if e["event"] == "most_records_dead_lettered"] == [
        "session windows need a block id (blk_...) in each line: use --window count for logs without one"]


# --- summary ---------------------------------------------------------------------------------------


def test_summary_counts_what_the_run_did() -> None:
    m = Metrics()
    m.lines_consumed.labels("t", "0").inc(10)
    m.lines_consumed.labels("t", "1").inc(5)
    m.parse_errors.labels("unparseable").inc(3)
    m.dlq_records.labels("unparseable").inc(3)
    m.dlq_records.labels("late").inc(1)
    m.windows_closed.labels("count", "size").inc(2)
    m.windows_closed.labels("count", "end_of_input").inc(1)
    m.verdicts.labels("normal").inc(2)
    m.verdicts.labels("anomalous").inc(1)
    m.alerts_published.labels("high").inc()
    m.alerts_published.labels("none").inc(2)
    assert m.summary() == {
        "records_read": 15, "records_replayed": 0, "records_parsed": 12,
        "dead_lettered": {"unparseable": 3, "late": 1},
        "windows_closed": 3, "windows_closed_by_reason": {"size": 2, "end_of_input": 1},
        "verdicts": {"normal": 2, "anomalous": 1}, "scoring_errors": 0, "alerts": {"high": 1},
    }


# --- librdkafka's log lines -------------------------------------------------------------------------


def test_client_log_lines_are_json_and_rate_limited() -> None:
    handler = _StructlogHandler(interval_s=60)
    record = logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, "%s [%s] %s",
                               ("FAIL", "rdkafka#consumer-1", "Connect to ipv4#127.0.0.1:1 failed"), None)

    def storm() -> None:
        for _ in range(200):  # ten seconds of a refused port at librdkafka's default retry rate
            handler.handle(record)

    events = captured(storm)
    assert len(events) == 1
    assert events[0]["event"] == "client_log" and events[0]["facility"] == "FAIL"
    assert events[0]["message"] == "Connect to ipv4#127.0.0.1:1 failed"
