"""Thin Kafka helpers: client configurations, topic creation, reading one record by position.

Everything here speaks plain Kafka (confluent-kafka / librdkafka) and works the same against
Apache Kafka and the embedded broker.
"""

from __future__ import annotations

import difflib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from logstream.errors import FENCED_PREFIX, FatalPipelineError, KafkaSetupError
from logstream.logs import get_logger, kafka_client_logger
from logstream.settings import Settings

_log = get_logger(__name__)


RECORD_OVERHEAD_BYTES = 65_536  # headers and batch framing on top of a record's value
# librdkafka retries a refused connection about 20 times a second by default; back off instead.
RECONNECT_BACKOFF_MS, RECONNECT_BACKOFF_MAX_MS = 500, 10_000
# How often clients look for topics they wait for (a consumer started before its input topic exists).
METADATA_REFRESH_MS = 2_000
KAFKA_CALL_TIMEOUT_S = 10.0  # a blocking client call (commit, transaction step, committed offsets)
CONNECT_ATTEMPT_S, CONNECT_RETRY_FIRST_S, CONNECT_RETRY_MAX_S = 2.0, 0.5, 5.0


class BrokerUnreachable(KafkaSetupError):
    """No broker of the bootstrap list answered within the connect timeout."""

    def __init__(self, bootstrap_servers: str, waited_s: float, detail: str) -> None:
        super().__init__(f"cannot reach Kafka at {bootstrap_servers} within {waited_s:g} s: {detail}")
        self.bootstrap_servers = bootstrap_servers


class TopicMissing(KafkaSetupError):
    """A topic the command must read does not exist (a typo, or the producer has not created it yet)."""

    exit_code = 2


class KafkaConfigError(KafkaSetupError):
    """librdkafka refused a client configuration (an unknown property, a bad value, two that conflict)."""

    exit_code = 2


ClientT = TypeVar("ClientT", Consumer, Producer, AdminClient)


def kafka_client(kind: Callable[[dict[str, Any]], ClientT], config: dict[str, Any]) -> ClientT:
    """`kind(config)` for Consumer, Producer or AdminClient; `KafkaConfigError` with librdkafka's reason
    when it refuses the configuration (construction connects to nothing: any failure is the configuration)."""
    try:
        return kind(config)
    except KafkaException as exc:
        raise KafkaConfigError(f"Kafka client configuration refused: {exc.args[0].str()}") from None


def check_client_configs(settings: Settings) -> None:
    """Build (and drop at once) the consumer, producer and admin client `run` and `repartition` will build, so a
    configuration librdkafka refuses is one `KafkaConfigError` at start, not a traceback after the model loaded.

    A property that only conflicts in one kind of client (`acks` with idempotence, `message.timeout.ms`
    above `transaction.timeout.ms`) is caught too. Nothing joins the group or starts a transaction:
    constructing a client does not fence anyone.
    """
    try:
        kafka_client(AdminClient, base_config(settings))
        kafka_client(Producer, producer_config(settings))
        kafka_client(Consumer, consumer_config(settings)).close()
    except KafkaConfigError as exc:
        given = ", ".join(sorted(settings.kafka_option))
        hint = f" (--kafka-option / LOGSTREAM_KAFKA_OPTION set: {given})" if given else ""
        raise KafkaConfigError(f"{exc}{hint}") from None


# A fence: another instance took this one's transactional id or static member id. librdkafka reports it
# with its own code, or as _FATAL whose text carries the original reason, so both are matched.
_PRODUCER_FENCES = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
_MEMBER_FENCES = (KafkaError.FENCED_INSTANCE_ID,)


def _fence_texts(codes: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(KafkaError(code).str().removeprefix("Broker: ").removeprefix("Local: ") for code in codes)


_PRODUCER_FENCE_TEXTS, _MEMBER_FENCE_TEXTS = _fence_texts(_PRODUCER_FENCES), _fence_texts(_MEMBER_FENCES)


def _fence_kind(error: KafkaError) -> str | None:
    """"producer" when another instance took this one's transactional id, "member" when it took its
    static member id, None when `error` is no fence."""
    code, text = error.code(), error.str()
    if code in _PRODUCER_FENCES or any(known in text for known in _PRODUCER_FENCE_TEXTS):
        return "producer"
    if code in _MEMBER_FENCES or any(known in text for known in _MEMBER_FENCE_TEXTS):
        return "member"
    return None


def is_fenced(error: KafkaError) -> bool:
    """Whether `error` says another instance took over this one's transactional id or static member id."""
    return _fence_kind(error) is not None


def is_fatal(error: KafkaError) -> bool:
    """Whether the client that reported `error` can do nothing more: librdkafka's fatal errors and fences."""
    return error.fatal() or error.code() == KafkaError._FATAL or is_fenced(error)


def lost_client_error(exc: SystemError) -> str | None:
    """The reason to stop for a client call that failed without its error, None when `exc` is another SystemError.

    confluent-kafka (2.16) can lose the exception of a fatal producer error raised in poll()/flush() when a
    delivery callback runs in the same call: the call fails with SystemError "<method 'flush' of
    'cimpl.Producer' objects> returned NULL without setting an exception". The producer is broken for
    good; its next transactional call (the abort on close) names the cause, which then replaces this
    one (`errors.first_cause`).
    """
    if "cimpl." not in str(exc):
        return None
    return f"Kafka client failed for good, without saying why ({exc})"


def stop_reason(exc: Exception, reason_of: Callable[[KafkaError], str]) -> str | None:
    """The one line to stop with when `exc` means this instance can do nothing more, else None.

    `FatalPipelineError`: its message; a `KafkaException` whose error is fatal (`is_fatal`: a client call
    raising it itself, e.g. producer.poll or produce): `reason_of(error)`; a `SystemError` from a lost
    client error (`lost_client_error`): that. Any other exception, or a Kafka error that is not fatal:
    None (the caller re-raises or logs it)."""
    if isinstance(exc, FatalPipelineError):
        return str(exc)
    if isinstance(exc, KafkaException):
        error: KafkaError = exc.args[0]
        return reason_of(error) if is_fatal(error) else None
    if isinstance(exc, SystemError):
        return lost_client_error(exc)
    return None


def fatal_reason(error: KafkaError, settings: Settings, transactional_id: str | None = None) -> str:
    """The one line an operator reads when a Kafka client of this instance stops for good.

    A fence names who took over (the transactional id, or the group and static member id) and what to
    do; any other fatal error is librdkafka's text. `transactional_id` is the producer's when it is not
    the consumer's default (`repartition` has its own).
    """
    kind = _fence_kind(error)
    if kind == "producer":
        tid = transactional_id or settings.transactional_id
        return (f"{FENCED_PREFIX}another instance started with transactional id {tid!r} ({_identity(settings)}) "
                "and took over; this one stops without committing more. If that was not this replica restarting, "
                "give each replica its own --group-instance-id")
    if kind == "member":
        given = "--group-instance-id" if settings.group_instance_id else (
            "the host name: without --group-instance-id, exactly-once uses it")
        return (f"{FENCED_PREFIX}another member joined group {settings.group_id!r} with the same group.instance.id "
                f"{settings.static_member_id!r} ({given}) and took over; this one stops. If that was not this "
                "replica restarting, give each replica its own --group-instance-id")
    return f"Kafka client failed for good: {error.str()} ({error.name()})"


def _identity(settings: Settings) -> str:
    """How an instance's transactional id came about, in flags."""
    if settings.group_instance_id:
        return f"--group-id {settings.group_id!r} and --group-instance-id {settings.group_instance_id!r}"
    return (f"--group-id {settings.group_id!r} on host {socket.gethostname()!r}: without --group-instance-id, "
            "exactly-once uses the host name")


def client_config(bootstrap_servers: str) -> dict[str, Any]:
    """What every logstream Kafka client shares: the address, backoff, and librdkafka logs through structlog."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "log.connection.close": False,
        "reconnect.backoff.ms": RECONNECT_BACKOFF_MS,
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        "logger": kafka_client_logger(),
    }


def base_config(settings: Settings) -> dict[str, Any]:
    return {**client_config(settings.bootstrap_servers), **settings.kafka_option}


def wait_for_broker(config: dict[str, Any], timeout_s: float) -> ClusterMetadata:
    """The cluster's metadata once a broker answers; `BrokerUnreachable` after `timeout_s`.

    Each attempt waits up to 2 s for an answer; retries back off exponentially (0.5 s doubling to
    5 s). The probe's own connection failures
    are not logged line by line: the one error names the bootstrap servers and librdkafka's last
    reason (connection refused, name not resolved, authentication failed, ...).
    """
    errors: list[KafkaError] = []
    probe = kafka_client(AdminClient, {**config, "log_level": 2, "error_cb": errors.append})  # 2: critical only
    bootstrap = str(config.get("bootstrap.servers"))
    deadline = time.monotonic() + timeout_s
    delay = CONNECT_RETRY_FIRST_S
    announced = False
    while True:
        try:
            return probe.list_topics(timeout=max(0.5, min(deadline - time.monotonic(), CONNECT_ATTEMPT_S)))
        except KafkaException as exc:
            probe.poll(0)  # delivers the error callbacks that say why
            detail = _connection_reason(errors) or exc.args[0].str()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnreachable(bootstrap, timeout_s, detail)
        if not announced:
            _log.info("waiting_for_broker", bootstrap_servers=bootstrap, error=detail, give_up_after_s=timeout_s)
            announced = True
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, CONNECT_RETRY_MAX_S)


def _connection_reason(errors: list[KafkaError]) -> str | None:
    """librdkafka's most specific recent reason, e.g. "Connect to ipv4#127.0.0.1:1 failed: Connection refused"."""
    generic = (KafkaError._ALL_BROKERS_DOWN,)
    for error in reversed(errors):
        if error.code() not in generic:
            text = error.str()
            return text.split("/bootstrap: ", 1)[-1].split(" (after ", 1)[0]
    return errors[-1].str() if errors else None


def require_topics(metadata: ClusterMetadata, topics: list[str], bootstrap_servers: str, role: str = "input") -> None:
    """`TopicMissing` naming every topic of `topics` the cluster does not have (with near names); `role` says
    what the topics are to the command ("input", "alerts", ...)."""
    missing = [topic for topic in topics
               if topic not in metadata.topics or metadata.topics[topic].error is not None]
    if not missing:
        return
    existing = [name for name in metadata.topics if not name.startswith("__")]
    parts = []
    for topic in missing:
        error = metadata.topics[topic].error if topic in metadata.topics else None
        text = f"{topic!r} ({error.str()})" if error is not None else repr(topic)
        near = difflib.get_close_matches(topic, existing, n=2)
        parts.append(text + (f" - did you mean {' or '.join(repr(n) for n in near)}?" if near else ""))
    noun = "topic" if len(missing) == 1 else "topics"
    raise TopicMissing(f"{role} {noun} {', '.join(parts)} not found on {bootstrap_servers}")


@dataclass(frozen=True)
class GroupView:
    """What the group coordinator says about a consumer group (for explaining a missing assignment)."""

    state: str
    members: list[tuple[str, str | None, str, list[str]]]  # member id, static id, host, partitions

    def others(self, member_id: str | None) -> list[tuple[str, str | None, str, list[str]]]:
        return [m for m in self.members if m[0] != member_id]


def describe_group(settings: Settings, timeout: float = 5.0) -> GroupView | None:
    """The group's state and members, or None when the coordinator does not answer in time."""
    admin = kafka_client(AdminClient, base_config(settings))
    try:
        found = admin.describe_consumer_groups([settings.group_id], request_timeout=timeout)[settings.group_id]
        group = found.result(timeout=timeout)
    except Exception:  # noqa: BLE001 - a diagnosis only: any failure means "no view"
        return None
    members = []
    for member in group.members:
        parts = member.assignment.topic_partitions if member.assignment else []
        members.append((member.member_id, member.group_instance_id, member.host,
                        [f"{tp.topic}/{tp.partition}" for tp in parts]))
    return GroupView(str(group.state).rsplit(".", 1)[-1], members)


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
        # a consumer started before its input topic exists gets it within seconds, not 5 minutes
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
    }
    if settings.static_member_id:
        config["group.instance.id"] = settings.static_member_id
    config.update(base_config(settings))
    return config


def assign_at(consumer: Consumer, partitions: list[TopicPartition], starts: dict[tuple[str, int], int]) -> None:
    """In an `on_assign` callback: take `partitions` on, those named in `starts` at the offset given there
    and the others where the client would start them (their committed offset).

    Assigning in the callback replaces the client's own assignment after it: `incremental_assign`, for
    the consumer's strategy is cooperative-sticky (`consumer_config`; `--kafka-option` cannot change it)."""
    targets = [TopicPartition(tp.topic, tp.partition, starts[(tp.topic, tp.partition)])
               if (tp.topic, tp.partition) in starts else tp for tp in partitions]
    consumer.incremental_assign(targets)


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


# The broker refused a topic as asked for (its settings, name or a policy): the command line must change.
_TOPIC_REQUEST_ERRORS = (KafkaError.INVALID_REPLICATION_FACTOR, KafkaError.INVALID_PARTITIONS,
                         KafkaError.INVALID_CONFIG, KafkaError.TOPIC_EXCEPTION, KafkaError.POLICY_VIOLATION,
                         KafkaError.INVALID_REPLICA_ASSIGNMENT)


def ensure_topics(settings: Settings, topics: dict[str, dict[str, str]], timeout: float = 30.0) -> None:
    """Create the missing topics among `topics` (name -> topic config); existing ones are left as they are.

    `KafkaSetupError` (one line) when the broker cannot be asked or refuses a topic: exit 2 when the
    request itself is wrong (`--topic-replication` above the brokers there are, a topic config the broker
    refuses), 1 otherwise (not authorized, broker trouble).
    """
    admin = kafka_client(AdminClient, base_config(settings))
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot list the topics on {settings.bootstrap_servers}: {exc.args[0].str()}") from None
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
            error: KafkaError = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            refused = KafkaSetupError(f"cannot create topic {name!r} on {settings.bootstrap_servers}: {error.str()} "
                                      "(create it beforehand and pass --no-create-topics, or change "
                                      "--topic-partitions / --topic-replication)")
            refused.exit_code = 2 if error.code() in _TOPIC_REQUEST_ERRORS else 1
            raise refused from None


def partitions_of(settings: Settings, topic: str, timeout: float = 10.0) -> list[int]:
    admin = kafka_client(AdminClient, base_config(settings))
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
    reader = kafka_client(
        Consumer,
        {
            **base_config(settings),
            "group.id": f"{settings.group_id}.state-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
            "auto.offset.reset": "error",
        },
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
