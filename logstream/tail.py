"""Following the alerts topic and printing each alert as it arrives (what an SRE's terminal shows)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException

from logstream.kafka import METADATA_REFRESH_MS, BrokerUnreachable, client_config, wait_for_broker

DEFAULT_CONNECT_TIMEOUT_S = 20.0


def format_alert(alert: dict) -> str:
    verdict, source, window = alert["verdict"], alert["source"], alert["window"]
    head = (f"[{verdict['severity'].upper():8}] score={verdict['score']:5.1f} {window['kind']} window "
            f"{window['key']} ({window['size']} lines, {source['topic']}/{source['partition']} "
            f"offsets {source['first_offset']}-{source['last_offset']}, {alert['event_time']['first']})")
    reasons = [f"    ! {item.get('reason')}: {item.get('template', '')}" for item in alert.get("evidence", [])[:3]]
    samples = [f"    > {sample['line'][:160]}" for sample in alert["sample_lines"][:3]]
    return "\n".join([head, *reasons, *samples])


def _check_connected(consumer: Consumer, topic: str, bootstrap_servers: str, lost_at: list[float]) -> None:
    """At an idle exit after a lost connection: `BrokerUnreachable` unless a metadata request succeeds now."""
    if not lost_at:
        return
    try:
        consumer.list_topics(topic, timeout=2.0)
    except KafkaException as exc:
        raise BrokerUnreachable(bootstrap_servers, round(time.monotonic() - lost_at[0]),
                                f"connection lost while following {topic!r} ({exc.args[0].str()})") from exc
    lost_at.clear()


def tail_alerts(
    bootstrap_servers: str,
    topic: str,
    *,
    stop: threading.Event,
    from_beginning: bool = False,
    raw_json: bool = False,
    idle_exit_s: float | None = None,
    on_alert: Callable[[dict[str, Any]], None] | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> int:
    """Print alerts until `stop` is set (or nothing arrives for `idle_exit_s`); returns how many.

    `on_alert` also gets each alert document (the demo scores them against the sample's labels).
    `BrokerUnreachable` when no broker answers within `connect_timeout_s` at start, or when the
    idle exit comes while the broker is unreachable (nothing arrived because nothing could). An
    outage while following is ridden out: librdkafka reconnects with backoff, its lines rate-limited.
    """
    config = client_config(bootstrap_servers)
    wait_for_broker(config, connect_timeout_s)
    lost_at: list[float] = []  # when the connection was lost (empty while connected)

    def on_error(error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT) and not lost_at:
            lost_at.append(time.monotonic())

    consumer = Consumer({
        **config,
        "group.id": f"logstream-tail-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        # the alerts topic may not exist yet (tail started before the consumer): notice it within seconds
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        "error_cb": on_error,
    })
    consumer.subscribe([topic])
    seen = 0
    last = time.monotonic()
    try:
        while not stop.is_set():
            message = consumer.poll(0.2)
            if message is None or message.error():
                if idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    _check_connected(consumer, topic, bootstrap_servers, lost_at)
                    break
                continue
            lost_at.clear()
            last = time.monotonic()
            seen += 1
            if raw_json:
                print(message.value().decode(), flush=True)
            if on_alert is not None or not raw_json:
                document = orjson.loads(message.value())
                if not raw_json:
                    print(format_alert(document), flush=True)
                if on_alert is not None:
                    on_alert(document)
    finally:
        consumer.close()
    return seen
