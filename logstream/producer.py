"""Streaming a log file into a raw topic, one record per line (demo, benchmarks, backfills).

With `key="block"` each line goes to the partition of its block (crc32 of the block id modulo the
topic's partitions, as `logstream repartition` routes), keyed by it. A line naming several blocks
that live on different partitions is sent to each of them, with headers saying which blocks it
carries there and which copy is the primary (`repartition.route`), so every block's session sees all
its lines exactly once and count windows count the line once.
"""

from __future__ import annotations

import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from logstream.files import iter_records
from logstream.kafka import client_config
from logstream.routing import route


def create_topic(bootstrap_servers: str, topic: str, partitions: int = 1) -> None:
    """Create `topic` unless it exists."""
    admin = AdminClient(client_config(bootstrap_servers))
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
    """Send each line of `path` as one record (per block partition with `key="block"`, see above).

    Returns how many lines were sent, all acknowledged; raises RuntimeError naming undelivered ones.
    """
    create_topic(bootstrap_servers, topic, partitions)
    producer = Producer({**client_config(bootstrap_servers), "linger.ms": 20, "enable.idempotence": True,
                         "compression.type": "zstd"})
    failures: list[str] = []

    def delivered(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    topic_partitions = len(producer.list_topics(topic, timeout=10).topics[topic].partitions)
    started = time.monotonic()
    sent = 0
    for record in iter_records(path):
        if limit is not None and sent >= limit:
            break
        value = record.rstrip(b"\r\n")
        for target in route(value, topic_partitions) if key == "block" else [None]:
            options = {} if target is None or target.partition is None else {"partition": target.partition}
            while True:
                try:
                    producer.produce(topic, value, target.key if target else None,
                                     headers=target.headers if target else None, on_delivery=delivered, **options)
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
