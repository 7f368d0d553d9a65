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

Partition of a block = crc32(block id) mod partitions: stable across restarts, clients and languages.
Lines without a block id keep their raw partition (mod the internal topic's partitions); the
consumer sends them to the dead-letter topic as `unkeyed`, as it would without repartitioning.

With `--guarantee exactly-once` the writes and the consumed offsets commit in one transaction
(consume-transform-produce), so a crash never duplicates a line in the internal topic; with
at-least-once a crash can repeat lines, which would appear twice in their session.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from logstream.assignment import AssignmentWatch, check_assignment
from logstream.kafka import (
    base_config,
    consumer_config,
    ensure_topics,
    partitions_of,
    producer_config,
    require_topics,
    wait_for_broker,
)
from logstream.logs import get_logger
from logstream.parsing import block_ids
from logstream.settings import Settings

log = get_logger(__name__)

BLOCKS_HEADER = "logstream.blocks"  # the blocks of a multi-block line this record carries
COPY_HEADER = "logstream.copy-of"  # on every copy but the primary: the primary's partition
CONSUME_BATCH = 500


@dataclass(frozen=True, slots=True)
class Routed:
    """One record carrying a line: where it goes (None: the producer's partitioner), key, headers."""

    partition: int | None
    key: bytes | None
    headers: list[tuple[str, bytes]] | None


def block_partition(block: str, partitions: int) -> int:
    """crc32 of the block id modulo the partitions: the same for every client, restart and language."""
    return zlib.crc32(block.encode()) % partitions


def route(value: bytes | None, partitions: int, unkeyed_partition: int | None = None,
          key: bytes | None = None) -> list[Routed]:
    """The records that carry one line keyed by block id, the primary copy first.

    One record per partition owning some of the line's blocks (`parsing.block_ids`), keyed by the
    first block routed there. A line naming several blocks carries `BLOCKS_HEADER` on each record,
    and `COPY_HEADER` on all but the primary (the partition of its first block). A line without a
    block id keeps `key` and goes to `unkeyed_partition`.
    """
    blocks = block_ids(value.decode("utf-8", "replace")) if value else ()
    if not blocks:
        return [Routed(unkeyed_partition, key, None)]
    targets: dict[int, list[str]] = {}
    for block in blocks:
        targets.setdefault(block_partition(block, partitions), []).append(block)
    primary = block_partition(blocks[0], partitions)
    return [Routed(partition, here[0].encode(), _headers(blocks, here, partition, primary))
            for partition, here in targets.items()]


def _headers(blocks: Sequence[str], here: list[str], partition: int, primary: int) -> list[tuple[str, bytes]] | None:
    if len(blocks) < 2:
        return None
    headers = [(BLOCKS_HEADER, ",".join(here).encode())]
    if partition != primary:
        headers.append((COPY_HEADER, str(primary).encode()))
    return headers


class Repartitioner:
    """The consume -> re-key -> produce -> commit loop (one consumer-group member)."""

    def __init__(self, settings: Settings, stop_event: threading.Event | None = None) -> None:
        if not settings.input_topic or not settings.repartition_topic:
            raise ValueError("repartition needs --input-topic and --repartition-topic")
        self.settings = settings
        self.stop_event = stop_event or threading.Event()
        self.exactly_once = settings.guarantee == "exactly-once"
        self.target = settings.repartition_topic
        self.positions: dict[tuple[str, int], int] = {}  # next offset to read, per assigned raw partition
        self.forwarded = 0
        self.partitions = 0
        self._owned: set[tuple[str, int]] = set()
        self._assigned = False
        self._assignment = AssignmentWatch(settings.input_topic, settings.effective_assignment_timeout_s)
        self._at_end: set[tuple[str, int]] = set()  # partitions read to their end (for --once)
        self._fatal: str | None = None
        self.producer: Producer
        self.consumer: Consumer

    def run(self) -> int:
        s = self.settings
        metadata = wait_for_broker(base_config(s), s.connect_timeout_s)  # BrokerUnreachable: one line, exit 1
        if s.once:
            require_topics(metadata, list(s.input_topic), s.bootstrap_servers)  # a batch run's input must exist
        if s.create_topics:
            ensure_topics(s, {self.target: {}})
        self.partitions = len(partitions_of(s, self.target))
        # A transactional id of its own: the consumer of the internal topic may run on the same host.
        config = producer_config(s)
        if self.exactly_once:
            config["transactional.id"] = f"{s.transactional_id}.repartition"
        self.producer = Producer(config)
        if self.exactly_once:
            self.producer.init_transactions(30)
            self.producer.begin_transaction()
        self.consumer = Consumer(consumer_config(s))
        self.consumer.subscribe(list(s.input_topic), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self._assignment = AssignmentWatch(s.input_topic, s.effective_assignment_timeout_s)
        log.info("repartition_started", source=s.input_topic, target=self.target, partitions=self.partitions,
                 guarantee=s.guarantee)
        last_commit = time.monotonic()
        done_once = False
        try:
            while not self.stop_event.is_set():
                if self._fatal:
                    raise RuntimeError(self._fatal)
                messages = self.consumer.consume(CONSUME_BATCH, 0.1)
                at_end = self._forward(messages)
                if time.monotonic() - last_commit >= s.commit_interval_s:
                    self._commit()
                    last_commit = time.monotonic()
                check_assignment(self._assignment, s, self.consumer, s.once)  # says why no partition comes
                if s.once and at_end and self._assigned and not self._assignment.waiting(once=True):
                    done_once = True
                    break
            self._commit()
        finally:
            if self.exactly_once and not (done_once or self.stop_event.is_set()):
                try:
                    self.producer.abort_transaction(10)
                except KafkaException:
                    pass
            self.producer.flush(30)
            self.consumer.close()
        log.info("repartition_stopped", forwarded=self.forwarded)
        return 0

    def _forward(self, messages: list[Message]) -> bool:
        for message in messages:
            error = message.error()
            tp = (message.topic(), message.partition())
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add(tp)
                else:
                    log.warning("consume_error", error=str(error))
                continue
            self._at_end.discard(tp)
            value = message.value()
            for target in route(value, self.partitions, message.partition() % self.partitions, message.key()):
                self._produce(target.partition, target.key, value, target.headers, message.timestamp()[1])
            self.positions[tp] = message.offset() + 1
            self.forwarded += 1
        self.producer.poll(0)
        return self._owned <= self._at_end

    def _produce(self, partition: int | None, key: bytes | None, value: bytes | None, headers: list | None,
                 timestamp: int) -> None:
        while True:
            try:
                self.producer.produce(self.target, value, key, partition=partition, headers=headers,
                                      timestamp=max(timestamp, 0), on_delivery=self._delivered)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None and not (self.exactly_once and error.code() == KafkaError._PURGE_QUEUE):
            self._fatal = f"delivery to {self.target} failed: {error}"

    def _commit(self) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.positions.items()]
        try:
            if self.exactly_once:
                if offsets:
                    self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
                self.producer.commit_transaction(30)
                self.producer.begin_transaction()
            else:
                if self.producer.flush(30):
                    raise RuntimeError("records still undelivered after 30 s; not committing")
                if offsets:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise
            if self.exactly_once and error.txn_requires_abort():
                self._abort_and_rewind()
            else:
                log.warning("repartition_commit_failed", error=str(error))

    def _abort_and_rewind(self) -> None:
        self.producer.abort_transaction(30)
        self.producer.begin_transaction()
        committed = self.consumer.committed([TopicPartition(t, p) for t, p in self.positions], timeout=10)
        for tp in committed:
            if tp.offset >= 0:
                self.consumer.seek(tp)
                self.positions[(tp.topic, tp.partition)] = tp.offset
        log.warning("repartition_rewound", partitions=len(committed))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = True
        self._assignment.on_assign(tp.topic for tp in partitions)
        self._owned |= {(tp.topic, tp.partition) for tp in partitions}
        if self.settings.once:
            for tp in partitions:
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
                committed = consumer.committed([tp], timeout=10)[0].offset
                if high <= max(low, committed):  # nothing to read as of start
                    self._at_end.add((tp.topic, tp.partition))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._commit()
        for tp in revoked:
            self.positions.pop(tp, None)
            self._at_end.discard(tp)
            self._owned.discard(tp)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.positions.pop((tp.topic, tp.partition), None)
            self._at_end.discard((tp.topic, tp.partition))
            self._owned.discard((tp.topic, tp.partition))
        if self.exactly_once:
            self._abort_and_rewind()  # the open transaction holds lines of the lost partitions
