"""Differential: `Ingest.handle` on whole consume batches = the same records handed over one at a time.

Real sample lines of two partitions, interleaved, with bad records, multi-block copies and routed
block headers, end-of-partition events and a replay fence, go through the consumer's ingest path
twice: one record per call (the per-line path) and in consume batches of uneven sizes. Everything
observable must agree: the windows handed on for scoring (ids, keys, close reasons, lines), the dead
letters (offset, reason, detail), in each partition's order; each partition's position, origin, end flag
and window snapshot, and every metric (but the wall-clock ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from prometheus_client import generate_latest

from logstream.checkpoint import CommittedPosition
from logstream.deadletters import DeadLetterWatch
from logstream.errors import FatalFlag
from logstream.ingest import Ingest
from logstream.logs import LogThrottle
from logstream.metrics import Metrics
from logstream.parsing import LineParser
from logstream.partitions import TP, PartitionState
from logstream.records import Window
from logstream.routing import BLOCKS_HEADER, COPY_HEADER
from logstream.settings import Settings
from logstream.windows import make_windower, window_options

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"
BAD = [b"", b"\xff\xfe not utf-8", b"line with a \x00 control", b"\r\n", b"x" * 70_000]


class RecordingPublisher:
    """Stands in for the Kafka publisher: records what would be dead-lettered (the input record's place)."""

    def __init__(self, dead_letters: DeadLetterWatch, metrics: Metrics) -> None:
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.sent: list[tuple[TP, int, str, str]] = []

    def dead_letter(self, state: PartitionState, message: Message, reason: str, detail: str) -> None:
        self.metrics.dlq_records.labels(reason).inc()
        self.dead_letters.dead(state.tp, reason, detail, message.offset())
        self.sent.append((state.tp, message.offset(), reason, detail))


def records(fmt: str, skewed: bool = False) -> list[Message]:
    """Two partitions of sample lines, interleaved in runs, with bad records, copies and end events;
    `skewed`: some HDFS lines from a clock days ahead (refused or clamped) or behind (late)."""
    lines = (SAMPLES / ("HDFS_2k.log" if fmt == "hdfs" else "BGL_2k.log")).read_bytes().splitlines()
    if skewed:
        lines = [b"081113" + line[6:] if i % 37 == 11 else b"081101" + line[6:] if i % 59 == 23 else line
                 for i, line in enumerate(lines)]
    out: list[Message] = []
    offsets = {0: 0, 1: 0}
    for i, line in enumerate(lines):
        partition = (i // 13) % 2
        value = BAD[(i // 97) % len(BAD)] if i % 97 == 5 else line
        headers = None
        if i % 41 == 3:
            headers = [(COPY_HEADER, b"1")]
        elif i % 53 == 7 and fmt == "hdfs":
            headers = [(BLOCKS_HEADER, b"blk_1,blk_2")]
        out.append(Message(topic="raw", partition=partition, offset=offsets[partition], value=value,
                           headers=headers, timestamp=(1, 1_700_000_000_000 + i)))
        offsets[partition] += 1
        if i % 211 == 17:
            out.append(Message(topic="raw", partition=partition, error=KafkaError(KafkaError._PARTITION_EOF)))
    out.append(Message(topic="raw", partition=1, error=KafkaError(KafkaError._PARTITION_EOF)))
    return out


def run(fmt: str, kind: str, messages: list[Message], sizes: list[int], **options: Any) -> dict[str, Any]:
    settings = Settings(input_topic=["raw"], format=fmt, window=kind, window_size=20, window_stride=10, **options)
    metrics = Metrics()
    dead_letters = DeadLetterWatch(metrics, fmt, kind)
    publisher = RecordingPublisher(dead_letters, metrics)
    submitted: list[tuple[TP, str, str, str, list[int]]] = []

    def submit(state: PartitionState, windows: list[Window]) -> None:
        submitted.extend((state.tp, w.window_id, w.key, w.close_reason, [line.offset for line in w.lines])
                         for w in windows)

    ingest = Ingest(settings, LineParser(fmt), metrics, publisher, dead_letters,  # type: ignore[arg-type]
                    FatalFlag(), LogThrottle(10.0), submit)
    options = window_options(settings)
    parts = {(topic, p): PartitionState((topic, p), make_windower(kind, topic, p, **options), 1,
                                        CommittedPosition(0, 40, None), metrics)
             for topic, p in (("raw", 0), ("raw", 1))}
    start, turn = 0, 0
    while start < len(messages):
        end = start + sizes[turn % len(sizes)]
        ingest.handle(messages[start:end], parts)
        start, turn = end, turn + 1
    for state in parts.values():
        submit(state, state.windower.flush())
    # each partition's order (the order across partitions is the fetcher's, not the consumer's)
    return {
        "submitted": sorted(submitted, key=lambda item: item[0]),
        "dead_letters": sorted(publisher.sent, key=lambda item: item[0]),
        "states": {tp: (s.position, s.origin, s.eof, s.windower.snapshot()) for tp, s in parts.items()},
        "metrics": sorted(line for line in generate_latest(metrics.registry).decode().splitlines()
                          if not line.startswith("#") and "_created" not in line and "commit_age" not in line),
    }


@pytest.mark.parametrize("fmt,kind", [("bgl", "count"), ("hdfs", "session"), ("hdfs", "count")])
def test_consume_batches_give_what_single_records_give(fmt: str, kind: str) -> None:
    messages = records(fmt)
    one_by_one = run(fmt, kind, messages, [1])
    assert one_by_one["submitted"] and one_by_one["dead_letters"]
    for sizes in ([500], [37, 1, 250], [len(messages)]):
        assert run(fmt, kind, messages, sizes) == one_by_one


@pytest.mark.parametrize("policy", ["dead-letter", "clamp"])
def test_session_batches_with_skewed_clocks(policy: str) -> None:
    """Lines from clocks days ahead (the event-time bound refuses or clamps them) and behind (late for
    their blocks), small session caps: consume batches still give what single records give."""
    messages = records("hdfs", skewed=True)
    options = {"future_policy": policy, "session_max_open": 40, "session_max_lines": 6}
    one_by_one = run("hdfs", "session", messages, [1], **options)
    reasons = {item[2] for item in one_by_one["dead_letters"]}
    assert ("future_timestamp" in reasons) == (policy == "dead-letter") and "late" in reasons
    for sizes in ([500], [37, 1, 250], [len(messages)]):
        assert run("hdfs", "session", messages, sizes, **options) == one_by_one
