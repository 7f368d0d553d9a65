"""Test helpers that speak plain Kafka to the embedded broker: produce lines, read topics, run the consumer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from logstream.detectors.base import Detector
from logstream.detectors.registry import load_detector
from logstream.metrics import Metrics
from logstream.pipeline import Pipeline
from logstream.settings import Settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLES = Path(__file__).resolve().parents[1] / "logstream" / "samples"

# Kafka group timings the embedded broker is checked with (DEVELOPERS.md).
GROUP_TIMINGS = {"max_poll_interval_ms": 10_000, "session_timeout_ms": 6_000}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, topic: str, partitions: int = 1, config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1, config=config or {})],
                                      operation_timeout=30).values():
        future.result()


def recreate_topic(bootstrap: str, topic: str, partitions: int = 1, timeout_s: float = 30.0) -> None:
    """Delete `topic` and create it again, empty (retried while the broker still finishes the deletion)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        future.result()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            create_topic(bootstrap, topic, partitions)
            return
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def produce_lines(
    bootstrap: str,
    topic: str,
    lines: Iterable[bytes | str],
    *,
    partition: int | None = None,
    keys: Iterable[bytes | None] | None = None,
) -> int:
    """Produce each line as one record (optionally to one partition, optionally keyed); returns the count."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    key_iter = iter(keys) if keys is not None else None
    count = 0
    for line in lines:
        value = line.encode() if isinstance(line, str) else line
        key = next(key_iter) if key_iter is not None else None
        kwargs: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                producer.produce(topic, value, key, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
    assert producer.flush(30) == 0
    return count


def read_topic(
    bootstrap: str, topic: str, *, read_committed: bool = True, idle_s: float = 2.0, timeout_s: float = 60.0
) -> list[Any]:
    """Every record of `topic` from the beginning, stopping once all partitions reached their end."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": unique("reader"), "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "enable.partition.eof": True,
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
    })
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    partitions = sorted(metadata.partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records: list[Any] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                if len(at_end) == len(partitions) and time.monotonic() - last > idle_s:
                    break
                continue
            if message.error():
                if message.error().code() == -191:  # partition EOF
                    at_end.add(message.partition())
                continue
            at_end.discard(message.partition())
            last = time.monotonic()
            records.append(message)
    finally:
        consumer.close()
    return records


def read_alerts(bootstrap: str, topic: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [orjson.loads(message.value()) for message in read_topic(bootstrap, topic, **kwargs)]


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        result = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in result}
    finally:
        consumer.close()


def committed_metadata(bootstrap: str, group: str, topic: str, partition: int = 0) -> tuple[int, dict | None]:
    """The group's committed offset of one partition and its metadata (decoded; None when it has none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, partition)], timeout=10)
        return tp.offset, orjson.loads(tp.metadata) if tp.metadata else None
    finally:
        consumer.close()


def wait_for(predicate, timeout: float, interval: float = 0.3) -> bool:  # noqa: ANN001
    """Poll `predicate` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_settings(bootstrap: str, topic: str, **overrides: Any) -> Settings:
    """Settings for one test run with unique output topics and group, and test-friendly group timings."""
    base: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "input_topic": [topic], "alerts_topic": f"{topic}.alerts",
        "dlq_topic": f"{topic}.dlq", "group_id": f"{topic}.group", "commit_interval_s": 0.5,
        "emit": "all", "detector": "null", **GROUP_TIMINGS,
    }
    base.update(overrides)
    return Settings(**base)


def run_once(settings: Settings, metrics: Metrics | None = None) -> int:
    """`logstream run --once` in this process; returns its exit code."""
    settings = settings.model_copy(update={"once": True})
    return Pipeline(settings, load_detector(settings), metrics=metrics).run()


class BackgroundPipeline:
    """A pipeline running in a thread until `stop()` (SIGTERM-equivalent)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, detector: Detector | None = None) -> None:
        self.stop_event = threading.Event()
        self.metrics = metrics or Metrics()
        self.pipeline = Pipeline(settings, detector or load_detector(settings), metrics=self.metrics,
                                 stop_event=self.stop_event)
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.exit_code = self.pipeline.run()

    def start(self) -> BackgroundPipeline:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return self.exit_code

    def stop(self, timeout: float = 60.0) -> int | None:
        self.stop_event.set()
        self._thread.join(timeout)
        return self.exit_code
