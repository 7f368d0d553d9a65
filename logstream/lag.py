"""Consumer lag per owned partition (metric `logstream_consumer_lag`), and the broker probe behind /readyz."""

from __future__ import annotations

import time
from collections.abc import Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition

from logstream.metrics import Health, Metrics
from logstream.partitions import TP, PartitionState

LAG_INTERVAL_S = 5.0


class LagMonitor:
    """Updates the lag gauges at most every `LAG_INTERVAL_S` (poll thread; blocks at most ~1 s per partition)."""

    def __init__(self, metrics: Metrics, health: Health, probe_topic: str) -> None:
        self.metrics = metrics
        self.health = health
        self.probe_topic = probe_topic
        self._last_at = 0.0

    def update(self, consumer: Consumer, parts: Mapping[TP, PartitionState], paused: bool) -> None:
        now = time.monotonic()
        if now - self._last_at < LAG_INTERVAL_S:
            return
        self._last_at = now
        if not self.health.broker_ok:
            self._probe_broker(consumer)
        # Paused partitions are not fetched, so their cached high watermark goes stale exactly when the
        # lag matters (backpressure): ask the broker then.
        cached = not paused
        for (topic, partition), state in parts.items():
            if state.position is None:
                continue
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=1.0, cached=cached)
            except KafkaException:
                if cached:
                    continue
                break  # the broker does not answer: do not stall the poll loop on every partition
            if high >= 0:
                self.metrics.consumer_lag.labels(topic, str(partition)).set(max(0, high - state.position))

    def _probe_broker(self, consumer: Consumer) -> None:
        """After a transport error, /readyz stays 503 until a metadata request proves the broker answers."""
        try:
            consumer.list_topics(self.probe_topic, timeout=1.0)
        except KafkaException:
            return
        self.health.broker_ok = True
