"""Thin Kafka helpers: client configurations, topic creation, reading one record by position.

Everything here speaks plain Kafka (confluent-kafka / librdkafka) and works the same against
Apache Kafka and the embedded broker.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from logstream.logs import kafka_client_logger
from logstream.settings import Settings


RECORD_OVERHEAD_BYTES = 65_536  # headers and batch framing on top of a record's value


def base_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "log.connection.close": False,
        "logger": kafka_client_logger(),
        **settings.kafka_option,
    }


def consumer_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "session.timeout.ms": settings.session_timeout_ms,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    if settings.group_instance_id:
        config["group.instance.id"] = settings.group_instance_id
    config.update(base_config(settings))
    return config


def producer_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "zstd",
        # above every output's budget (outputs.OutputLimits; state chunks are at most 1,000,000 bytes)
        "message.max.bytes": max(1_000_000, settings.dlq_max_bytes, settings.alert_max_bytes) + RECORD_OVERHEAD_BYTES,
    }
    if settings.guarantee == "exactly-once":
        config.update(
            {
                "transactional.id": settings.transactional_id,
                "transaction.timeout.ms": 120_000,
                "message.timeout.ms": 110_000,
            }
        )
    else:
        config["message.timeout.ms"] = 300_000
    config.update(base_config(settings))
    return config


def ensure_topics(settings: Settings, topics: dict[str, dict[str, str]], timeout: float = 30.0) -> None:
    """Create the missing topics among `topics` (name -> topic config); existing ones are left as they are."""
    admin = AdminClient(base_config(settings))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, settings.topic_partitions, settings.topic_replication, config=config)
        for name, config in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def partitions_of(settings: Settings, topic: str, timeout: float = 10.0) -> list[int]:
    admin = AdminClient(base_config(settings))
    meta = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None:
        raise KafkaException(meta.error if meta else f"topic {topic} not found")
    return sorted(meta.partitions)


def read_record(settings: Settings, topic: str, partition: int, offset: int, timeout: float = 15.0) -> bytes | None:
    """The value of the record at `offset`, or None when it is gone (retention) or never arrives.

    Read uncommitted on purpose: callers only ask for offsets named by a committed consumer offset,
    which the transaction committed atomically with the record. read_committed would add nothing
    and could stall behind another producer's open transaction on the same partition (the last
    stable offset stops there), or, as seen with the embedded broker right after a fenced
    transaction was aborted, skip the committed record.
    """
    reader = Consumer(
        {
            **base_config(settings),
            "group.id": f"{settings.group_id}.state-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
        }
    )
    try:
        reader.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = reader.poll(0.2)
            if message is None:
                continue
            if message.error():
                if message.error().code() in (KafkaError._PARTITION_EOF, KafkaError.OFFSET_OUT_OF_RANGE):
                    return None
                continue
            if message.offset() == offset:
                return message.value()
            if message.offset() > offset:
                return None
        return None
    finally:
        reader.close()
