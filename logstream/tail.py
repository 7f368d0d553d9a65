"""Following the alerts topic and printing each alert as it arrives (what an SRE's terminal shows)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Consumer


def format_alert(alert: dict) -> str:
    verdict, source, window = alert["verdict"], alert["source"], alert["window"]
    head = (f"[{verdict['severity'].upper():8}] score={verdict['score']:5.1f} {window['kind']} window "
            f"{window['key']} ({window['size']} lines, {source['topic']}/{source['partition']} "
            f"offsets {source['first_offset']}-{source['last_offset']}, {alert['event_time']['first']})")
    reasons = [f"    ! {item.get('reason')}: {item.get('template', '')}" for item in alert.get("evidence", [])[:3]]
    samples = [f"    > {sample['line'][:160]}" for sample in alert["sample_lines"][:3]]
    return "\n".join([head, *reasons, *samples])


def tail_alerts(
    bootstrap_servers: str,
    topic: str,
    *,
    stop: threading.Event,
    from_beginning: bool = False,
    raw_json: bool = False,
    idle_exit_s: float | None = None,
    on_alert: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Print alerts until `stop` is set (or nothing arrives for `idle_exit_s`); returns how many.

    `on_alert` also gets each alert document (the demo scores them against the sample's labels)."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap_servers,
        "group.id": f"logstream-tail-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        # the alerts topic may not exist yet (tail started before the consumer): notice it within seconds
        "topic.metadata.refresh.interval.ms": 2000,
    })
    consumer.subscribe([topic])
    seen = 0
    last = time.monotonic()
    try:
        while not stop.is_set():
            message = consumer.poll(0.2)
            if message is None or message.error():
                if idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
                continue
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
