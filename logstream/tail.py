"""Following the alerts and dead-letter topics and printing each record as it arrives (an SRE's terminal).

`follow_topic` is the one consume loop; `tail_alerts` and `tail_dead_letters` only decide how a
record is printed. A record that is not what the command reads (a dead letter on the alerts topic,
say) stops it with `WrongTopic`, a one-line reason, instead of a decoding traceback.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from logstream.kafka import (
    METADATA_REFRESH_MS,
    BrokerUnreachable,
    client_config,
    kafka_client,
    require_topics,
    wait_for_broker,
)
from logstream.logs import get_logger

DEFAULT_CONNECT_TIMEOUT_S = 20.0
_log = get_logger(__name__)

DLQ_REASON_HEADER = "logstream.reason"


class WrongTopic(ValueError):
    """The topic holds records of another kind than the command reads; the message says what to use."""


def _headers(message: Message) -> dict[str, bytes]:
    return {name: value or b"" for name, value in (message.headers() or [])}


def decode_alert(message: Message) -> dict[str, Any]:
    """The alert document of a record; `WrongTopic` when the record is not one (a dead letter, a raw line)."""
    where = f"{message.topic()}/{message.partition()} offset {message.offset()}"
    if DLQ_REASON_HEADER in _headers(message):
        raise WrongTopic(f"{where} is a dead-letter record, not an alert; read this topic with "
                         f"`logstream dlq --topic {message.topic()}`")
    try:
        document = orjson.loads(message.value() or b"")
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict) or "verdict" not in document:
        raise WrongTopic(f"{where} is not a logstream alert (not an alert JSON document); is "
                         f"{message.topic()!r} the alerts topic?")
    return document


def format_alert(alert: dict) -> str:
    verdict, source, window = alert["verdict"], alert["source"], alert["window"]
    head = (f"[{verdict['severity'].upper():8}] score={verdict['score']:5.1f} {window['kind']} window "
            f"{window['key']} ({window['size']} lines, {source['topic']}/{source['partition']} "
            f"offsets {source['first_offset']}-{source['last_offset']}, {alert['event_time']['first']})")
    reasons = [f"    ! {_evidence_reason(item)}: {item.get('template', '')}" for item in alert.get("evidence", [])[:3]]
    samples = [f"    > {sample['line'][:160]}" for sample in alert["sample_lines"][:3]]
    return "\n".join([head, *reasons, *samples])


def _evidence_reason(item: dict) -> str:
    """`reason`, with LogLLM's measured contribution and line count where the item has them."""
    details = []
    if "count" in item:
        details.append(f"{item['count']}x")
    if isinstance(item.get("contribution"), (int, float)):
        details.append(f"{item['contribution']:+.2f} {item.get('method', '')}".rstrip())
    return f"{item.get('reason')} ({', '.join(details)})" if details else str(item.get("reason"))


def follow_topic(
    bootstrap_servers: str,
    topic: str,
    handle: Callable[[Message], None],
    *,
    stop: threading.Event,
    from_beginning: bool = False,
    idle_exit_s: float | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    role: str = "the",
) -> int:
    """Call `handle` on each record of `topic` until `stop` is set (or nothing arrives for `idle_exit_s`).

    Returns how many records were handled. Reads committed records only, from a throwaway group.
    Exceptions from `handle` (e.g. `WrongTopic`) propagate after the consumer is closed.
    `BrokerUnreachable` when no broker answers within `connect_timeout_s` at start, or when the
    idle exit comes while the broker is unreachable (nothing arrived because nothing could). A topic
    missing at start is waited for (logged as `topic_missing`); `TopicMissing` (exit 2) at an idle exit
    when nothing arrived because it still does not exist, naming it as the `role` topic ("alerts").
    An outage while following is ridden out: librdkafka reconnects with backoff, its lines rate-limited.
    """
    config = client_config(bootstrap_servers)
    if topic not in wait_for_broker(config, connect_timeout_s).topics:
        _log.warning("topic_missing", topic=topic, bootstrap_servers=bootstrap_servers,
                     action="waiting: it is read within seconds of being created")
    lost_at: list[float] = []  # when the connection was lost (empty while connected)

    def on_error(error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT) and not lost_at:
            lost_at.append(time.monotonic())

    consumer = kafka_client(Consumer, {
        **config,
        "group.id": f"logstream-tail-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        # the topic may not exist yet (tail started before the consumer): notice it within seconds
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
                    if not seen:  # nothing arrived: say so if it is because the topic does not exist
                        require_topics(consumer.list_topics(timeout=10), [topic], bootstrap_servers, role)
                    break
                continue
            lost_at.clear()
            last = time.monotonic()
            handle(message)
            seen += 1
    finally:
        consumer.close()
    return seen


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
    Raises `WrongTopic` at the first record that is not an alert."""

    def handle(message: Message) -> None:
        document = decode_alert(message)
        if raw_json:
            print(message.value().decode(), flush=True)
        else:
            print(format_alert(document), flush=True)
        if on_alert is not None:
            on_alert(document)

    return follow_topic(bootstrap_servers, topic, handle, stop=stop, from_beginning=from_beginning,
                        idle_exit_s=idle_exit_s, connect_timeout_s=connect_timeout_s, role="alerts")


def dead_letter(message: Message) -> dict[str, Any]:
    """A dead-letter record as a JSON-ready dict: its headers by name and the original bytes.

    `original` is the text when the bytes are UTF-8, else None; `original_base64` always holds
    the exact bytes (as kept: a record over `--dlq-max-bytes` keeps its head, `original_size` says
    how long it was). Raises `WrongTopic` for a record without the `logstream.reason` header."""
    headers = _headers(message)
    if DLQ_REASON_HEADER not in headers:
        raise WrongTopic(f"{message.topic()}/{message.partition()} offset {message.offset()} is not a dead-letter "
                         f"record (no {DLQ_REASON_HEADER} header); is {message.topic()!r} the dead-letter topic?")
    value = message.value() or b""

    def number(name: str) -> int | None:
        raw = headers.get(name)
        return int(raw) if raw and raw.isdigit() else None  # bytes: isdigit is ASCII digits only

    try:
        original: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        original = None
    return {
        "dlq": {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()},
        "reason": headers[DLQ_REASON_HEADER].decode(errors="replace"),
        "detail": headers.get("logstream.detail", b"").decode(errors="replace"),
        "source": {
            "topic": headers.get("logstream.source.topic", b"").decode(errors="replace") or None,
            "partition": number("logstream.source.partition"),
            "offset": number("logstream.source.offset"),
        },
        "original": original,
        "original_base64": base64.b64encode(value).decode(),
        "original_size": number("logstream.original-size") or len(value),
        "key": (message.key() or b"").decode(errors="replace") or None,
    }


def format_dead_letter(record: dict[str, Any], max_bytes: int = 300) -> str:
    """Two lines: where it came from and why; then the original bytes, escaped (repr) and cut at `max_bytes`."""
    source = record["source"]
    head = (f"[{record['reason']}] {source['topic']}/{source['partition']} offset {source['offset']}"
            + (f": {record['detail']}" if record["detail"] else ""))
    raw = base64.b64decode(record["original_base64"])
    shown = repr(raw[:max_bytes])
    cut = record["original_size"] - min(len(raw), max_bytes)
    return f"{head}\n    bytes ({record['original_size']}): {shown}" + (f" ... (+{cut} bytes)" if cut > 0 else "")


def tail_dead_letters(
    bootstrap_servers: str,
    topic: str,
    *,
    stop: threading.Event,
    from_beginning: bool = False,
    raw_json: bool = False,
    idle_exit_s: float | None = None,
    max_bytes: int = 300,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> int:
    """Print dead-letter records (reason, detail, source offset, original bytes); returns how many.

    Raises `WrongTopic` at the first record without the dead-letter headers."""

    def handle(message: Message) -> None:
        record = dead_letter(message)
        if raw_json:
            print(orjson.dumps(record).decode(), flush=True)
        else:
            print(format_dead_letter(record, max_bytes), flush=True)

    return follow_topic(bootstrap_servers, topic, handle, stop=stop, from_beginning=from_beginning,
                        idle_exit_s=idle_exit_s, connect_timeout_s=connect_timeout_s, role="dead-letter")
