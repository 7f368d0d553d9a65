"""Windows and outputs under real-world faults, against the real broker (issue 17 items 3-5, issue 13 item 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jsonschema
import orjson
import pytest

from logstream.producer import produce_file
from logstream.records import Verdict, Window, window_id
from logstream.repartition import Repartitioner
from logstream.routing import BLOCKS_HEADER, COPY_HEADER, block_partition
from tests.hardening_inputs import CLOCK_AHEAD_HDFS, CLOCK_AHEAD_INDEX
from tests.kafkatools import (
    SAMPLES,
    SHARED_DATA,
    BackgroundPipeline,
    committed_metadata,
    committed_offsets,
    create_topic,
    make_settings,
    produce_lines,
    read_alerts,
    read_topic,
    run_once,
    unique,
    wait_for,
)

BGL = (SAMPLES / "BGL_2k.log").read_bytes().splitlines()
ROOT = Path(__file__).resolve().parents[2]


def reasons(bootstrap: str, dlq_topic: str) -> list[tuple[str, int]]:
    out = []
    for message in read_topic(bootstrap, dlq_topic):
        headers = {k: v.decode() for k, v in message.headers()}
        out.append((headers["logstream.reason"], int(headers["logstream.source.offset"])))
    return out


# --- 17.4: a line from a clock far ahead -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["dead-letter", "clamp"])
def test_a_line_from_a_clock_two_days_ahead_drags_no_other_line_into_lateness(bootstrap: str, policy: str) -> None:
    topic = unique("future")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, CLOCK_AHEAD_HDFS)
    settings = make_settings(bootstrap, topic, format="hdfs", window="session", session_gap=300.0,
                             future_policy=policy)
    assert run_once(settings) == 0

    dead = reasons(bootstrap, settings.dlq_topic)
    assert all(reason != "late" for reason, _ in dead)
    if policy == "dead-letter":
        assert dead == [("future_timestamp", CLOCK_AHEAD_INDEX)]
    else:
        assert dead == []
    sessions = {a["window"]["key"]: (a["source"]["first_offset"], a["source"]["last_offset"], a["window"]["size"])
                for a in read_alerts(bootstrap, settings.alerts_topic)}
    far_block_first = CLOCK_AHEAD_INDEX if policy == "clamp" else 5
    assert sessions == {  # every block judged, each once, with all its (correctly stamped) lines
        "blk_38865049064139660": (0, 4, 2),
        "blk_-6952295868487656571": (1, 6, 3),
        "blk_7128370237687728475": (far_block_first, 5, 2 if policy == "clamp" else 1),
    }


# --- 13.3: a count window closes after an idle time, and the cut survives a restart ---------------------


class SlowDetector:
    """A real detector's contract, slower than the consumer's shutdown timeout (judging is still under way)."""

    name = "null"
    version = "1"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        time.sleep(self.seconds)
        return [Verdict(anomalous=False, score=0.0)] * len(windows)

    def close(self) -> None:
        return None


def test_a_quiet_count_window_is_judged_after_the_idle_time_and_a_restart_cuts_it_the_same(bootstrap: str) -> None:
    """Ten lines and an undecodable record, quiet: the cut falls on line 9 and its commit fences at the
    position (11), so the restart publishes the cut's window and does not dead-letter record 10 again."""
    topic = unique("idle")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, [*BGL[:10], b"\xff\xfe not utf-8"])
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=50, window_idle_s=2.0,
                             shutdown_timeout_s=1.0)

    # The cut is committed before its window is published; this consumer stops while the window is
    # still being judged, so only the commit that records the cut survives it.
    first = BackgroundPipeline(settings, detector=SlowDetector(8.0)).start()
    assert wait_for(lambda: (committed_metadata(bootstrap, settings.group_id, topic)[1] or {}).get("snapshot"), 30)
    offset, metadata = committed_metadata(bootstrap, settings.group_id, topic)
    assert offset == 0 and metadata["fence"] == 11 and metadata["snapshot"] == {"cuts": [9]}
    assert first.stop() == 0
    assert read_alerts(bootstrap, settings.alerts_topic, idle_s=0.5) == []

    # Restart: the replay reaches the cut and publishes that window; ten more lines, quiet again.
    second = BackgroundPipeline(settings).start()
    try:
        assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.3)) == 1, 30)
        produced = time.monotonic()
        produce_lines(bootstrap, topic, BGL[10:20])
        assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.3)) == 2, 30)
        judged_after = time.monotonic() - produced
    finally:
        assert second.stop() == 0
    alerts = read_alerts(bootstrap, settings.alerts_topic)
    got = [(a["source"]["first_offset"], a["source"]["last_offset"], a["window"]["close_reason"], a["window"]["id"])
           for a in alerts]
    key = f"{topic}/0"
    assert got == [(0, 9, "idle", window_id(topic, 0, "count", key, 0, 9)),
                   (11, 20, "idle", window_id(topic, 0, "count", key, 11, 20))]
    assert judged_after < 2.0 + 15.0, "judged within the idle time (plus polling and a commit)"
    assert reasons(bootstrap, settings.dlq_topic) == [("undecodable", 10)], "dead-lettered once, before the cut"


def test_quiet_sessions_close_after_session_idle_s_and_a_restart_before_the_commit_publishes_them(
        bootstrap: str) -> None:
    """--session-idle-s (off by default): a partition read to its end and quiet closes every open session
    (reason idle). Stopped while they are judged, the consumer leaves a commit that records the cut; the
    next one replays up to the cut's line and publishes the same sessions, with the same ids."""
    hdfs = (SAMPLES / "HDFS_2k.log").read_bytes().splitlines()[:5]  # five blocks, one line each
    topic = unique("sessidle")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, hdfs)
    settings = make_settings(bootstrap, topic, format="hdfs", window="session", session_idle_s=2.0,
                             shutdown_timeout_s=1.0)
    first = BackgroundPipeline(settings, detector=SlowDetector(8.0)).start()
    assert wait_for(lambda: "cuts" in ((committed_metadata(bootstrap, settings.group_id, topic)[1] or {})
                                       .get("snapshot") or {}), 30)
    offset, metadata = committed_metadata(bootstrap, settings.group_id, topic)
    assert offset == 0 and metadata["fence"] == 5 and metadata["snapshot"]["cuts"] == [4]
    assert first.stop() == 0
    assert read_alerts(bootstrap, settings.alerts_topic, idle_s=0.5) == []

    second = BackgroundPipeline(settings).start()
    try:
        assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.3)) == 5, 30)
    finally:
        assert second.stop() == 0
    got = sorted((a["source"]["first_offset"], a["window"]["close_reason"], a["window"]["id"])
                 for a in read_alerts(bootstrap, settings.alerts_topic))
    blocks = [line.decode().split("blk_")[1].split()[0] for line in hdfs]
    assert got == sorted((i, "idle", window_id(topic, 0, "session", f"blk_{block}", i, i))
                         for i, block in enumerate(blocks))


def test_idle_windows_across_a_sigkill_are_the_same_windows(bootstrap: str, tmp_path: Path) -> None:
    topic = unique("idlekill")
    create_topic(bootstrap, topic)
    args = ["--bootstrap-servers", bootstrap, "--input-topic", topic, "--alerts-topic", f"{topic}.alerts",
            "--dlq-topic", f"{topic}.dlq", "--group-id", f"{topic}.g", "--group-instance-id", "a",
            "--format", "bgl", "--detector", "null", "--emit", "all", "--window-size", "50",
            "--window-idle-s", "2", "--commit-interval-s", "0.5", "--max-poll-interval-ms", "10000",
            "--session-timeout-ms", "6000"]
    log = (tmp_path / "run.log").open("ab")

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "logstream.cli", "run", *args], stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})

    def alerts() -> list[dict]:
        return read_alerts(bootstrap, f"{topic}.alerts", idle_s=0.3)

    process = start()
    try:
        produce_lines(bootstrap, topic, BGL[:10])
        assert wait_for(lambda: len(alerts()) == 1, 60), (tmp_path / "run.log").read_text()[-2000:]
        produce_lines(bootstrap, topic, BGL[10:30])  # the next window is open when the consumer dies
        time.sleep(1.0)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        produce_lines(bootstrap, topic, BGL[30:35])
        process = start()  # the same static member: its partition comes back at once
        assert wait_for(lambda: len(alerts()) == 2, 60), (tmp_path / "run.log").read_text()[-2000:]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    # at-least-once: a window may be published again after a kill, but only as the same window (same id)
    got = {(a["window"]["id"], a["source"]["first_offset"], a["source"]["last_offset"], a["window"]["close_reason"])
           for a in read_alerts(bootstrap, f"{topic}.alerts")}
    assert sorted(g[1:] for g in got) == [(0, 9, "idle"), (10, 34, "idle")], "the first cut kept, the open one rebuilt"


# --- 17.5: every output fits its limits; nothing stops a partition ---------------------------------------

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "logstream/schemas/alert.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def test_an_alert_of_two_600_kb_lines_is_published_truncated_and_the_consumer_goes_on(bootstrap: str) -> None:
    topic = unique("huge")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, [b"x" * 600_000, b"y" * 600_000, b"cache warm complete", b"cache warm complete"])
    settings = make_settings(bootstrap, topic, format="generic", window="count", window_size=2)
    running = BackgroundPipeline(settings).start()
    try:
        assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.3)) == 2, 60)
        produce_lines(bootstrap, topic, [b"cache warm complete", b"cache warm complete"])
        assert wait_for(lambda: len(read_alerts(bootstrap, settings.alerts_topic, idle_s=0.3)) == 3, 60)
        assert running.alive, "the consumer keeps going"
    finally:
        assert running.stop() == 0
    messages = read_topic(bootstrap, settings.alerts_topic)
    big = orjson.loads(messages[0].value())
    VALIDATOR.validate(big)
    assert big["truncated"] == ["templates", "sample_lines"] and big["window"]["size"] == 2
    assert len(messages[0].value()) < settings.alert_max_bytes
    # a restart from the committed offsets neither loops on that window nor judges it again
    assert run_once(settings) == 0
    assert len(read_alerts(bootstrap, settings.alerts_topic)) == 3


def test_an_alerts_topic_with_a_smaller_limit_gets_alerts_that_fit_it(bootstrap: str) -> None:
    topic = unique("smalltopic")
    create_topic(bootstrap, topic)
    create_topic(bootstrap, f"{topic}.alerts", config={"max.message.bytes": "6000"})
    lines = [f"worker {chr(103 + i % 20) * (300 + i)} stalled".encode() for i in range(50)]  # g-z: not hex
    produce_lines(bootstrap, topic, lines)
    settings = make_settings(bootstrap, topic, format="generic", window="count", window_size=50)
    assert run_once(settings) == 0
    (message,) = read_topic(bootstrap, settings.alerts_topic)
    assert len(message.value()) <= 6000 - 1500
    doc = orjson.loads(message.value())
    VALIDATOR.validate(doc)
    assert "templates" in doc["truncated"] and doc["distinct_templates"] == 50
    assert read_topic(bootstrap, settings.dlq_topic) == []


def test_a_session_snapshot_larger_than_a_state_record_is_split_and_replayed_exactly(bootstrap: str) -> None:
    path = SHARED_DATA / "HDFS" / "HDFS_train_sample.log"
    if not path.exists():
        pytest.skip("shared HDFS training sample not available")
    with path.open("rb") as handle:
        lines = [next(handle).rstrip(b"\n") for _ in range(8000)]
    topic = unique("split")
    create_topic(bootstrap, topic)
    options = {"format": "hdfs", "window": "session", "session_gap": 3600.0, "session_max_open": 200}
    first = make_settings(bootstrap, topic, **options)
    create_topic(bootstrap, first.resolved_state_topic, config={"cleanup.policy": "compact",
                                                                "max.message.bytes": "4096"})
    produce_lines(bootstrap, topic, lines[:4000])
    running = BackgroundPipeline(first).start()
    assert wait_for(lambda: len(committed_metadata(bootstrap, first.group_id, topic)[1] or {}) > 0, 60)
    time.sleep(1.5)  # let it commit a cut with sessions still open
    assert running.stop() == 0
    _, metadata = committed_metadata(bootstrap, first.group_id, topic)
    assert isinstance(metadata["state"][0], list) and len(metadata["state"]) > 1, metadata
    records = read_topic(bootstrap, first.resolved_state_topic)
    assert records and max(len(r.value()) for r in records) <= 4096

    produce_lines(bootstrap, topic, lines[4000:])
    assert run_once(first) == 0
    seen = Counter(a["alert_id"] for a in read_alerts(bootstrap, first.alerts_topic))
    reference = make_settings(bootstrap, topic, **options, group_id=unique("ref"), alerts_topic=unique("ref-alerts"))
    assert run_once(reference) == 0
    expected = Counter(a["alert_id"] for a in read_alerts(bootstrap, reference.alerts_topic))
    assert set(seen) == set(expected), "same windows, same ids, nothing lost or invented"


# --- 17.3: a line naming several blocks, across partitions ---------------------------------------------


def blocks_on_different_partitions(partitions: int) -> tuple[str, str]:
    first = "blk_7128370237687728475"
    for n in range(1000, 2000):
        other = f"blk_-{n}8487656571"
        if block_partition(other, partitions) != block_partition(first, partitions):
            return first, other
    raise AssertionError("no pair found")


def multi_block_lines(a: str, b: str) -> list[str]:
    return [
        f"081109 203615 148 INFO dfs.DataNode$PacketResponder: Received block {a} of size 67108864 from /10.251.39.1",
        f"081109 203616 148 INFO dfs.DataNode$PacketResponder: Received block {b} of size 67108864 from /10.251.39.1",
        f"081109 203617 35 INFO dfs.FSNamesystem: BLOCK* ask 10.251.39.1:50010 to delete {a} {b}",
        f"081109 203618 19 INFO dfs.FSDataset: Deleting block {a} file /mnt/hadoop/dfs/data/current/{a}",
        f"081109 203619 19 INFO dfs.FSDataset: Deleting block {b} file /mnt/hadoop/dfs/data/current/{b}",
    ]


@pytest.mark.parametrize("path", ["produce --key block", "repartition", "repartition exactly-once"])
def test_a_line_naming_blocks_on_two_partitions_joins_each_session_once(bootstrap: str, tmp_path: Path,
                                                                          path: str) -> None:
    partitions = 4
    a, b = blocks_on_different_partitions(partitions)
    log_file = tmp_path / "hdfs.log"
    log_file.write_text("\n".join(multi_block_lines(a, b)) + "\n")
    topic = unique("multiblock")
    if path == "produce --key block":
        assert produce_file(bootstrap_servers=bootstrap, topic=topic, path=log_file, partitions=partitions,
                            key="block") == 5
        records = read_topic(bootstrap, topic)
        assert len(records) == 6  # the two-block line once per partition
        copies = [dict(m.headers() or []) for m in records if b"to delete" in m.value()]
        assert sorted(h[BLOCKS_HEADER] for h in copies) == sorted([a.encode(), b.encode()])
        assert [COPY_HEADER in h for h in copies].count(True) == 1
    else:
        raw = unique("raw")
        create_topic(bootstrap, raw)
        produce_lines(bootstrap, raw, log_file.read_text().splitlines())
        create_topic(bootstrap, topic, partitions)
        guarantee = "exactly-once" if path.endswith("exactly-once") else "at-least-once"
        settings = make_settings(bootstrap, raw, repartition_topic=topic, group_id=unique("repartition"), once=True,
                                 guarantee=guarantee)
        assert Repartitioner(settings).run() == 0
        if guarantee == "exactly-once":  # the offsets went into the transaction with the records
            assert committed_offsets(bootstrap, settings.group_id, raw) == {0: 5}

    sessions = make_settings(bootstrap, topic, format="hdfs", window="session")
    assert run_once(sessions) == 0
    alerts = read_alerts(bootstrap, sessions.alerts_topic)
    assert sorted((x["window"]["key"], x["window"]["size"]) for x in alerts) == sorted([(a, 3), (b, 3)])
    assert read_topic(bootstrap, sessions.dlq_topic) == []

    counts = make_settings(bootstrap, topic, format="hdfs", window="count", group_id=unique("count"),
                           alerts_topic=unique("count-alerts"))
    assert run_once(counts) == 0
    assert sum(x["window"]["size"] for x in read_alerts(bootstrap, counts.alerts_topic)) == 5, "each line once"
