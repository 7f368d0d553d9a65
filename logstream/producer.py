"""Streaming a log file into a raw topic, one record per line (demo, benchmarks, backfills)."""

from __future__ import annotations

import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from logstream.files import iter_records
from logstream.parsing import block_ids


def create_topic(bootstrap_servers: str, topic: str, partitions: int = 1) -> None:
    """Create `topic` unless it exists."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    if topic in admin.list_topics(timeout=10).topics:
        return
    for future in admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30).values():
        future.result()


def produce_file(
    *,
    bootstrap_servers: str,
    topic: str,
    path: Path,
    partitions: int = 1,
    key: str = "none",
    rate: float = 0.0,
    limit: int | None = None,
) -> int:
    """Send each line of `path` as one record; returns how many were sent (all acknowledged)."""
    create_topic(bootstrap_servers, topic, partitions)
    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 20, "enable.idempotence": True,
                         "compression.type": "zstd"})
    failures: list[str] = []

    def delivered(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    started = time.monotonic()
    sent = 0
    for record in iter_records(path):
        if limit is not None and sent >= limit:
            break
        record_key = None
        if key == "block":
            ids = block_ids(record.decode("utf-8", "replace"))
            record_key = ids[0].encode() if ids else None
        while True:
            try:
                producer.produce(topic, record.rstrip(b"\r\n"), record_key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        sent += 1
        producer.poll(0)
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    remaining = producer.flush(60)
    if remaining or failures:
        raise RuntimeError(f"{remaining} records undelivered, {len(failures)} failed: {failures[:3]}")
    return sent
