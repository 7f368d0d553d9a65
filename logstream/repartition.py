"""`logstream repartition`: re-key raw log lines by block id into an internal topic.

Session windows are per partition. When producers do not key raw lines by block id, one block's
lines land on several partitions and no single consumer sees the whole session. Kafka's own answer
(Kafka Streams' repartition topics) is a through-topic keyed by the aggregation key: this command
reads the raw topic and writes every line to the partition of each block it names. A line naming
blocks that map to different partitions is written once per partition, with the header
`logstream.blocks` listing only the blocks routed there, so each session sees the line exactly once
and no partition opens sessions for blocks it does not own; every copy but the one on the partition
of the line's first block also carries `logstream.copy-of` (that partition), so count windows and
the dead-letter topic take the line once. `logstream run` honours both headers, and `logstream
produce --key block` writes the same records (`route`), so either path gives each block one session.

The routing rule is `routing.route` (crc32 of the block id mod partitions). Lines without a block id
keep their raw partition (mod the internal topic's partitions); the consumer sends them to the
dead-letter topic as `unkeyed`, as it would without repartitioning.

With `--guarantee exactly-once` the writes and the consumed offsets commit in one transaction
(consume-transform-produce), so a crash never duplicates a line in the internal topic; with
at-least-once a crash can repeat lines, which would appear twice in their session. Commits, aborts
and rewinds are the consumer's own (`checkpoint.CommitPolicy`): each partition's position is a cut,
committed once the lines below it are acknowledged (or inside the transaction that wrote them).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from logstream.assignment import AssignmentWatch, check_assignment
from logstream.checkpoint import CommitPolicy, CommittedPosition, Cut, OutputLedger, PartitionCut, close_clients
from logstream.errors import FatalFlag, FatalPipelineError, first_cause
from logstream.kafka import (
    KAFKA_CALL_TIMEOUT_S,
    assign_at,
    base_config,
    consumer_config,
    ensure_topics,
    is_fatal,
    kafka_client,
    partitions_of,
    producer_config,
    require_topics,
    stop_reason,
    wait_for_broker,
)
from logstream.logs import LogThrottle, get_logger
from logstream.resume import resume_position, warn
from logstream.routing import route
from logstream.settings import Settings

log = get_logger(__name__)

TP = tuple[str, int]
CONSUME_BATCH = 500
REBALANCE_DRAIN_S = 10.0


class _Source:
    """One assigned raw partition: the next offset to read and the ledger of lines written for it."""

    __slots__ = ("position", "origin", "ledger", "epoch", "last_committed")

    def __init__(self, committed: int | None, epoch: int) -> None:
        self.position = committed  # next offset to read (None: nothing read or committed yet)
        self.origin = committed  # where this ownership started reading
        self.ledger = OutputLedger()
        self.epoch = epoch
        self.last_committed = committed


class Repartitioner:
    """The consume -> re-key -> produce -> commit loop (one consumer-group member)."""

    def __init__(self, settings: Settings, stop_event: threading.Event | None = None) -> None:
        if not settings.input_topic or not settings.repartition_topic:
            raise ValueError("repartition needs --input-topic and --repartition-topic")
        self.settings = settings
        self.stop_event = stop_event or threading.Event()
        self.exactly_once = settings.guarantee == "exactly-once"
        self.target = settings.repartition_topic
        self.sources: dict[TP, _Source] = {}
        self.forwarded = 0
        self.partitions = 0
        self._epoch = 0
        self._assigned = False
        self._assignment = AssignmentWatch(settings.input_topic, settings.effective_assignment_timeout_s)
        self._at_end: set[TP] = set()  # partitions read to their end (for --once)
        self._fatal = FatalFlag()
        self.failure: str | None = None  # why the run stopped with exit code 2 (one line for the operator)
        self._committing = True  # False once the run failed or stops uncleanly: nothing more is committed
        self._error_log = LogThrottle(10.0)
        # A transactional id of its own: the consumer of the internal topic may run on the same host.
        config = producer_config(settings)
        if self.exactly_once:
            config["transactional.id"] = f"{settings.transactional_id}.repartition"
        self.policy = CommitPolicy(settings, self, config, self.stop_event)
        self.consumer: Consumer

    def run(self) -> int:
        """Run until stopped (or, with `once`, until the input is consumed). Returns the exit code."""
        s = self.settings
        metadata = wait_for_broker(base_config(s), s.connect_timeout_s)  # BrokerUnreachable: one line, exit 1
        if s.once:
            require_topics(metadata, list(s.input_topic), s.bootstrap_servers)  # a batch run's input must exist
        if s.create_topics:
            ensure_topics(s, {self.target: {}})
        self.partitions = len(partitions_of(s, self.target))
        self.consumer = kafka_client(Consumer, {**consumer_config(s), "error_cb": self._on_kafka_error})
        clean = False
        code = 0
        try:
            self.policy.start(self.consumer)  # exactly-once: a fenced or broken producer is fatal (exit 2)
            self.consumer.subscribe(list(s.input_topic), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
            self._assignment = AssignmentWatch(s.input_topic, s.effective_assignment_timeout_s)
            log.info("repartition_started", source=s.input_topic, target=self.target, partitions=self.partitions,
                     guarantee=s.guarantee)
            while not self.stop_event.is_set():
                self._fatal.raise_if_set()
                messages = self.consumer.consume(CONSUME_BATCH, 0.1)
                at_end = self._forward(messages)
                self.policy.tick()
                check_assignment(self._assignment, s, self.consumer, s.once)  # says why no partition comes
                if s.once and at_end and self._assigned and not self._assignment.waiting(once=True):
                    break
            self.policy.complete_now(math.inf if s.once else time.monotonic() + s.shutdown_timeout_s)
            clean = True
        except (FatalPipelineError, KafkaException, SystemError) as exc:  # `kafka.stop_reason`
            if (reason := stop_reason(exc, self.policy.fatal_reason)) is None:
                raise
            code = self._fail(reason)
        finally:
            problem = self._close(clean)
        if problem is not None:
            code = self._fail(problem)
        log.info("repartition_stopped", forwarded=self.forwarded, clean=code == 0)
        return code

    def _fail(self, reason: str) -> int:
        """Record the fatal condition that explains the stop (`failure`, `errors.first_cause`; logged as
        `repartition_fatal`); exit code 2."""
        reason = first_cause(self.failure, reason)
        if reason != self.failure:
            self.failure = reason
            log.error("repartition_fatal", error=reason)
        self._committing = False
        return 2

    def _close(self, clean: bool) -> str | None:
        """Flush (or abort) the producer and leave the group; a fatal Kafka error met here is returned, never
        raised (after an unclean stop, partitions taken back on close are dropped without a commit)."""
        self._committing = self._committing and clean
        return close_clients(self.policy, self.consumer, clean)

    def _on_kafka_error(self, error: KafkaError) -> None:
        """The consumer's error callback: a fatal error (a newer member took the static id) stops the loop;
        others are logged, at most one per error name every 10 s."""
        if is_fatal(error):
            self._fatal.set(self.policy.fatal_reason(error))
        suppressed = self._error_log.allow(error.name(), time.monotonic())
        if suppressed is not None:
            log.warning("kafka_error", error=str(error), code=error.name(), suppressed_since_last=suppressed)

    def _forward(self, messages: list[Message]) -> bool:
        for message in messages:
            error = message.error()
            tp = (message.topic(), message.partition())
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add(tp)
                elif is_fatal(error):
                    self._fatal.set(self.policy.fatal_reason(error))
                else:
                    log.warning("consume_error", error=str(error))
                continue
            source = self.sources.get(tp)
            if source is None:
                continue  # fetched just before its partition was revoked
            self._at_end.discard(tp)
            value = message.value()
            for target in route(value, self.partitions, message.partition() % self.partitions, message.key()):
                self._produce(tp, source, target.partition, target.key, value, target.headers, message.timestamp()[1])
            if source.origin is None:
                source.origin = message.offset()
            source.position = message.offset() + 1
            self.forwarded += 1
        assert self.policy.producer is not None
        self.policy.producer.poll(0)
        return set(self.sources) <= self._at_end

    def _produce(self, tp: TP, source: _Source, partition: int | None, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None, timestamp: int) -> None:
        producer = self.policy.producer
        assert producer is not None
        seq = source.ledger.issue()
        callback = functools.partial(self._delivered, tp, source.epoch, seq)
        while True:
            try:
                producer.produce(self.target, value, key, partition=partition, headers=headers,
                                 timestamp=max(timestamp, 0), on_delivery=callback)
                break
            except BufferError:
                producer.poll(0.1)
        if self.exactly_once:
            source.ledger.complete(seq)  # part of the open transaction: done when it commits

    def _delivered(self, tp: TP, epoch: int, seq: int, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            if is_fatal(error):
                self._fatal.set(self.policy.fatal_reason(error))
            elif not (self.exactly_once and error.code() == KafkaError._PURGE_QUEUE):
                self._fatal.set(f"delivery to {self.target} failed: {error}")
            return
        source = self.sources.get(tp)
        if not self.exactly_once and source is not None and source.epoch == epoch:
            source.ledger.complete(seq)

    # --- the commit policy's host (checkpoint.CommitHost) ----------------------------------------

    def take_cut(self) -> Cut | None:
        cut = Cut()
        for tp, source in self.sources.items():
            if source.position is not None and source.position != source.last_committed:
                cut.partitions[tp] = PartitionCut(source.position, source.position, source.ledger.issued, None)
        return cut if cut.partitions else None

    def ledgers(self) -> Mapping[TP, OutputLedger]:
        return {tp: source.ledger for tp, source in self.sources.items()}

    def pump(self) -> None:
        self._fatal.raise_if_set()

    def wait(self, seconds: float) -> None:
        """Deliveries are served by the policy's producer poll: nothing else to wait for."""

    def committed(self, parts: Mapping[TP, PartitionCut]) -> None:
        for tp, part in parts.items():
            self.sources[tp].last_committed = part.commit_offset

    def rewound(self, tp: TP, position: CommittedPosition) -> int | None:
        old = self.sources[tp]
        self._epoch += 1
        self.sources[tp] = _Source(position.offset, self._epoch)
        self._at_end.discard(tp)
        return position.offset if position.offset is not None else old.origin

    # --- rebalance callbacks ----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = True
        self._assignment.on_assign(tp.topic for tp in partitions)
        if not partitions:
            return
        committed = consumer.committed(partitions, timeout=KAFKA_CALL_TIMEOUT_S)
        seeks: dict[TP, int] = {}
        for tp in committed:
            key = (tp.topic, tp.partition)
            self._epoch += 1
            start = tp.offset if tp.offset >= 0 else None
            if self.settings.once:
                bounds = consumer.get_watermark_offsets(tp, timeout=KAFKA_CALL_TIMEOUT_S)
                position = CommittedPosition(start, start or 0, None)
                resume = resume_position(position, None, bounds)  # a recreated topic: from its earliest offset
                warn(key, position, resume, None, bounds)
                if resume.seek is not None:
                    start = seeks[key] = resume.seek
                if bounds[1] <= max(bounds[0], start or 0):  # nothing to read as of start
                    self._at_end.add(key)
            # A streaming run needs no such check: with no fence, the client's own reset (auto.offset.reset
            # earliest) of an offset beyond the end forwards every record of the new log.
            self.sources[key] = _Source(start, self._epoch)
        if seeks:
            assign_at(consumer, partitions, seeks)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions} & set(self.sources)
        if not revoked:
            return
        if not self._committing:  # closing after a failure: the next owner replays from the last commit
            self._drop(revoked)
            return
        self.policy.complete_now(time.monotonic() + min(REBALANCE_DRAIN_S, self.settings.shutdown_timeout_s))
        self._drop(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions} & set(self.sources)
        if self._committing:  # a fenced instance must not start a fresh transactional producer
            self._fatal.raise_if_set()
            self.policy.on_lost(lost)  # exactly-once: the open transaction holds lines of the lost partitions
        self._drop(lost)

    def _drop(self, tps: set[TP]) -> None:
        for tp in tps:
            self.sources.pop(tp, None)
            self._at_end.discard(tp)
        self.policy.forget(tps)
