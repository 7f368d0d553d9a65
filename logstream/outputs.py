"""The largest record each output topic takes, so every alert, dead letter and state record fits.

Two limits apply to a record logstream writes: the producer's `message.max.bytes` (set above every
budget, `kafka.producer_config`) and the topic's `max.message.bytes` (broker side; a topic created
by someone else may take less than logstream's settings say). At start the pipeline reads each
output topic's limit and takes, per output, the smaller of its configured budget and that limit
less room for key, headers and batch framing. What is larger is shortened, never refused by the
broker: alerts are truncated (`alerts.encode_alert`), dead-letter values keep their head, state
snapshots are split over several records. So no window or record can stop its partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from logstream.kafka import RECORD_OVERHEAD_BYTES, base_config, ensure_topics, kafka_client
from logstream.logs import get_logger
from logstream.settings import Settings

log = get_logger(__name__)

OUTPUT_OVERHEAD_BYTES = 8192  # key (at most MAX_KEY_BYTES), logstream's headers (~1.3 KB), batch framing
MAX_KEY_BYTES = 1024
STATE_CHUNK_BYTES = 1_000_000
MAX_ERROR_CHARS = 10_000  # a detector's error message in a dead-letter body


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """Largest value, in bytes, of each kind of output record."""

    alert: int
    dlq: int
    state: int


def topic_limits(settings: Settings, topics: Iterable[str], timeout: float = 10.0) -> dict[str, int]:
    """`max.message.bytes` of each topic the broker describes (topics it cannot describe are left out)."""
    admin = kafka_client(AdminClient, base_config(settings))
    futures = admin.describe_configs([ConfigResource("topic", topic) for topic in dict.fromkeys(topics)])
    limits: dict[str, int] = {}
    for resource, future in futures.items():
        try:
            entry = future.result(timeout=timeout).get("max.message.bytes")
        except (KafkaException, TimeoutError) as exc:
            log.warning("topic_limit_unknown", topic=resource.name, error=str(exc),
                        consequence="the configured output size is used")
            continue
        if entry is not None and entry.value:
            limits[resource.name] = int(entry.value)
    return limits


def fit(budget: int, topic_limit: int | None) -> int:
    """The configured budget, lowered to what a topic with `topic_limit` takes."""
    if topic_limit is None:
        return budget
    return min(budget, topic_limit - min(OUTPUT_OVERHEAD_BYTES, topic_limit // 4))


def output_limits(settings: Settings) -> OutputLimits:
    """The budgets for this run, from the settings and the output topics' limits (logged)."""
    topics = {"alert": settings.alerts_topic, "dlq": settings.dlq_topic, "state": settings.resolved_state_topic}
    found = topic_limits(settings, topics.values())
    limits = OutputLimits(
        alert=fit(settings.alert_max_bytes, found.get(topics["alert"])),
        dlq=fit(settings.dlq_max_bytes, found.get(topics["dlq"])),
        state=fit(STATE_CHUNK_BYTES, found.get(topics["state"])),
    )
    log.info("output_limits", alert_bytes=limits.alert, dlq_bytes=limits.dlq, state_chunk_bytes=limits.state,
             topic_limits=found)
    return limits


def ensure_output_topics(settings: Settings) -> None:
    """Create the alert, dead-letter and (compacted) state topics where missing, each taking its budget."""
    ensure_topics(
        settings,
        {
            settings.alerts_topic: {"max.message.bytes": str(settings.alert_max_bytes + RECORD_OVERHEAD_BYTES)},
            settings.dlq_topic: {"max.message.bytes": str(settings.dlq_max_bytes + RECORD_OVERHEAD_BYTES)},
            settings.resolved_state_topic: {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000",
                                            "max.message.bytes": str(STATE_CHUNK_BYTES + RECORD_OVERHEAD_BYTES)},
        },
    )
