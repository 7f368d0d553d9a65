"""The consumer end to end against the real embedded broker: windows, alerts, offsets, restarts, DLQ."""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import jsonschema
import pytest

from logstream.parsing import LineParser
from tests.kafkatools import (
    SAMPLES,
    SHARED_DATA,
    BackgroundPipeline,
    committed_offsets,
    create_topic,
    make_settings,
    produce_lines,
    read_alerts,
    read_topic,
    run_once,
    unique,
)

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "logstream/schemas/alert.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def sample_lines(name: str, limit: int | None = None) -> list[bytes]:
    lines = (SAMPLES / name).read_bytes().splitlines()
    return lines[:limit] if limit else lines


def hdfs_train_lines(limit: int) -> list[bytes]:
    path = SHARED_DATA / "HDFS" / "HDFS_train_sample.log"
    if not path.exists():
        pytest.skip("shared HDFS training sample not available")
    with path.open("rb") as handle:
        return [next(handle).rstrip(b"\n") for _ in range(limit)]


def test_bgl_count_windows_offsets_schema_and_commit(bootstrap: str) -> None:
    topic = unique("bgl")
    lines = sample_lines("BGL_2k.log", 1234)
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, lines)
    settings = make_settings(bootstrap, topic, format="bgl", window="count")
    assert run_once(settings) == 0

    alerts = read_alerts(bootstrap, settings.alerts_topic)
    assert len(alerts) == math.ceil(len(lines) / 100) == 13
    for alert in alerts:
        VALIDATOR.validate(alert)
    spans = sorted((a["source"]["first_offset"], a["source"]["last_offset"], a["window"]["size"]) for a in alerts)
    assert spans == [(k * 100, min(k * 100 + 99, len(lines) - 1), min(100, len(lines) - k * 100)) for k in range(13)]
    assert {a["verdict"]["label"] for a in alerts} == {"normal"}  # the null detector
    assert committed_offsets(bootstrap, settings.group_id, topic) == {0: len(lines)}

    # --once again with the same group: nothing new to read, nothing published
    assert run_once(settings) == 0
    assert len(read_alerts(bootstrap, settings.alerts_topic)) == len(alerts)


def test_hdfs_session_windows_match_a_groupby(bootstrap: str) -> None:
    topic = unique("hdfs")
    lines = sample_lines("HDFS_2k.log")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, lines)
    settings = make_settings(bootstrap, topic, format="hdfs", window="session", session_gap=1e9)
    assert run_once(settings) == 0

    parser = LineParser("hdfs")
    expected: dict[str, list] = defaultdict(list)
    for offset, raw in enumerate(lines):
        parsed = parser.parse(raw, topic=topic, partition=0, offset=offset, record_time=0.0)
        for block in parsed.block_ids:
            expected[block].append(parsed)
    alerts = read_alerts(bootstrap, settings.alerts_topic)
    assert len(alerts) == len(expected) == 2200
    for alert in alerts:
        VALIDATOR.validate(alert)
        members = expected[alert["window"]["key"]]
        assert alert["window"]["kind"] == "session"
        assert alert["window"]["size"] == len(members)
        assert (alert["source"]["first_offset"], alert["source"]["last_offset"]) == (members[0].offset,
                                                                                    members[-1].offset)
        assert {t["template"]: t["count"] for t in alert["templates"]} == Counter(m.template for m in members)
    multi = [w for w in expected.values() if any(len(m.block_ids) > 1 for m in w)]
    assert multi, "the sample has lines naming several blocks"


def alert_ids(alerts: list[dict]) -> Counter[str]:
    return Counter(a["alert_id"] for a in alerts)


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_restart_in_the_middle_publishes_every_window_once(bootstrap: str, guarantee: str) -> None:
    """SIGTERM after the first half, restart on the second: the union equals one uninterrupted run."""
    topic = unique("restart")
    lines = hdfs_train_lines(12_000)
    create_topic(bootstrap, topic)
    options = {"format": "hdfs", "window": "session", "session_gap": 3600.0, "session_max_open": 200,
               "guarantee": guarantee}

    produce_lines(bootstrap, topic, lines[:6000])
    first = make_settings(bootstrap, topic, **options)
    running = BackgroundPipeline(first).start()
    deadline = time.monotonic() + 60
    while committed_offsets(bootstrap, first.group_id, topic).get(0, -1) < 0 and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.5)  # let it commit a cut with sessions still open
    assert running.stop() == 0
    part_one = read_alerts(bootstrap, first.alerts_topic)
    assert part_one, "windows closed before the stop"
    snapshots = read_topic(bootstrap, first.resolved_state_topic)
    assert snapshots, "open sessions too large for commit metadata went to the state topic"

    produce_lines(bootstrap, topic, lines[6000:])
    assert run_once(first) == 0
    split_run = read_alerts(bootstrap, first.alerts_topic)

    reference = make_settings(bootstrap, topic, **options, group_id=unique("ref"), alerts_topic=unique("ref-alerts"))
    assert run_once(reference) == 0
    expected = alert_ids(read_alerts(bootstrap, reference.alerts_topic))
    assert max(expected.values()) == 1

    seen = alert_ids(split_run)
    assert set(seen) == set(expected), "same windows, same ids, nothing lost or invented"
    if guarantee == "exactly-once":
        assert seen == expected, "no duplicates in exactly-once mode"


def test_count_windows_survive_a_restart_exactly(bootstrap: str) -> None:
    topic = unique("bglrestart")
    lines = sample_lines("BGL_2k.log")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, lines[:1050])
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=100, window_stride=50)
    running = BackgroundPipeline(settings).start()
    deadline = time.monotonic() + 60
    while committed_offsets(bootstrap, settings.group_id, topic).get(0, -1) < 1000 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert running.stop() == 0
    produce_lines(bootstrap, topic, lines[1050:])
    assert run_once(settings) == 0
    alerts = read_alerts(bootstrap, settings.alerts_topic)
    starts = sorted(a["source"]["first_offset"] for a in alerts)
    # sliding windows of 100 every 50 lines, then the two tail windows closed at the end of input
    assert starts == list(range(0, 1901, 50)) + [1950]
    assert len(alert_ids(alerts)) == len(alerts)


def test_bad_records_go_to_the_dead_letter_topic_and_the_consumer_carries_on(bootstrap: str) -> None:
    topic = unique("bad")
    good = sample_lines("BGL_2k.log", 300)
    bad = {
        b"": "empty",
        b"\xff\xfe\xfd not utf-8": "undecodable",
        b"this is not a BGL line": "unparseable",
        b"- 1117838570 2005.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO \x00 nul": "control_characters",
        b"- " + b"x" * 5000: "too_large",
        "caf\u00e9".encode()[:-1]: "undecodable",
    }
    records: list[bytes] = []
    for i, line in enumerate(good):
        records.append(line)
        if i % 50 == 0:
            records.extend(bad)
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, records)
    settings = make_settings(bootstrap, topic, format="bgl", window="count", max_line_bytes=4096, dlq_max_bytes=4096)
    assert run_once(settings) == 0

    alerts = read_alerts(bootstrap, settings.alerts_topic)
    assert len(alerts) == 3 and sum(a["window"]["size"] for a in alerts) == len(good)
    dead = read_topic(bootstrap, settings.dlq_topic)
    assert len(dead) == 6 * len(bad)
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers()}
        value = message.value()
        if "logstream.original-size" in headers:  # longer than --dlq-max-bytes: the head of the original
            assert headers["logstream.reason"] == "too_large" and len(value) == 4096
            value = next(record for record in bad if record.startswith(value))
            assert int(headers["logstream.original-size"]) == len(value)
        assert bad[value] == headers["logstream.reason"]
        assert headers["logstream.source.topic"] == topic
        assert int(headers["logstream.source.offset"]) >= 0
    assert committed_offsets(bootstrap, settings.group_id, topic) == {0: len(records)}
