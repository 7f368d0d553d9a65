"""Which offset is safe to commit, and what a replay from it needs to rebuild the same windows.

Every output (alert, dead-letter record, state snapshot) gets a sequence number in the ledger of the
input partition it came from. A *cut* is taken every commit interval: for each partition it records
  - the commit offset C: the first offset of the oldest open window (else the next offset to read),
    so a restart replays every line an open window still needs;
  - the fence P: the next offset to read when the cut was taken. Lines below P were fully handled
    (their windows, if closed, are part of this cut; their dead-letter records too), so a replay
    from C suppresses every side effect below P;
  - the windower snapshot (see below);
  - the outputs issued before the cut.
The cut is committed once all those outputs are done: acknowledged by the broker (at-least-once),
or produced inside the transaction that also carries the offsets (exactly-once). Outputs issued after
a pending cut are not part of it, so nothing is committed before the alerts it covers exist.

The fence and a small snapshot travel in the commit's metadata; a large snapshot is written to the
state topic and the metadata points at its records ([partition, offset] of each), which keeps within
Kafka's 4 KB offset-metadata limit. A snapshot larger than one record may be (`outputs.OutputLimits`)
is split over several records, read back and joined in order. The metadata also names the window
settings the cut was taken under (`fingerprint`: a digest and a summary of a few hundred bytes at
most, next to an inline snapshot of at most `INLINE_SNAPSHOT_LIMIT`): a new owner with other
settings, or one that finds the log recreated, does not trust the fence and the snapshot (`resume`).

Snapshots: session engines record which sessions were open at P (and the event-time bound's state
where the replay starts); count engines the offsets where an idle cut closed every open window.
When an idle cut's windows are still to be published, the cut commits C at their first line and P
at the position when the cut was taken, so a replay reaches the cut's line
and publishes them, though below P (`windows.AddResult.cut`), and repeats nothing else read before
the cut (`partitions.PartitionState.idle_cut`).

`CommitPolicy` drives it (cf. arroyo's commit policy, Quix Streams' checkpoint): when a cut is taken
(every commit interval, or when asked), when it is complete, how it is committed (a plain offset
commit, or the offsets sent into the open transaction and the transaction committed), and the
recovery on commit errors (exactly-once: abort, then rewind every partition to its last commit).
Both consume -> produce -> commit loops (`pipeline.Pipeline`, `repartition.Repartitioner`) use it
through the small `CommitHost` interface.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from logstream.errors import FatalPipelineError
from logstream.fingerprint import WindowFingerprint
from logstream.kafka import KAFKA_CALL_TIMEOUT_S, fatal_reason, is_fatal, kafka_client, read_record, stop_reason
from logstream.logs import get_logger
from logstream.settings import Settings

log = get_logger(__name__)

METADATA_VERSION = 1
INLINE_SNAPSHOT_LIMIT = 2048

TopicPartitionKey = tuple[str, int]


class OutputLedger:
    """Sequence numbers of one partition's outputs, and which of them are done."""

    __slots__ = ("issued", "_done", "done_through")

    def __init__(self) -> None:
        self.issued = 0
        self._done: set[int] = set()
        self.done_through = 0  # every seq <= this is done

    def issue(self) -> int:
        self.issued += 1
        return self.issued

    def issue_many(self, n: int) -> range:
        """Sequence numbers for `n` outputs at once: those `n` calls of `issue` return, in order."""
        first = self.issued + 1
        self.issued += n
        return range(first, first + n)

    def complete(self, seq: int) -> None:
        if seq <= self.done_through:
            return
        self._done.add(seq)
        while self.done_through + 1 in self._done:
            self.done_through += 1
            self._done.discard(self.done_through)

    @property
    def outstanding(self) -> int:
        return self.issued - self.done_through - len(self._done)


@dataclass(slots=True)
class PartitionCut:
    """The committable position of one partition at the moment a cut was taken."""

    commit_offset: int
    fence: int
    required_seq: int
    snapshot: dict[str, Any] | None
    # (partition, offset) of each record of the snapshot in the state topic, set as they are acknowledged
    state_refs: list[tuple[int, int] | None] = field(default_factory=list)
    settings: WindowFingerprint | None = None  # the window settings the cut was taken under

    def metadata(self) -> str:
        """The commit metadata string: fence, window settings (when known), and the snapshot inline or
        pointers to its records."""
        body: dict[str, Any] = {"v": METADATA_VERSION, "fence": self.fence}
        if self.settings is not None:
            body["settings_id"] = self.settings.digest
            body["settings"] = self.settings.summary
        if self.state_refs:
            refs = [list(ref) for ref in self.state_refs if ref is not None]
            if len(refs) != len(self.state_refs):
                raise RuntimeError("state records not acknowledged yet: the cut is not complete")
            body["state"] = refs[0] if len(refs) == 1 else refs
        elif self.snapshot is not None:
            body["snapshot"] = self.snapshot
        return orjson.dumps(body).decode()

    @property
    def needs_state_record(self) -> bool:
        return self.snapshot is not None and len(orjson.dumps(self.snapshot)) > INLINE_SNAPSHOT_LIMIT


@dataclass(slots=True)
class Cut:
    """One cut across all assigned partitions; committed as a whole."""

    partitions: dict[TopicPartitionKey, PartitionCut] = field(default_factory=dict)

    def complete(self, ledgers: dict[TopicPartitionKey, OutputLedger]) -> bool:
        for tp, cut in self.partitions.items():
            ledger = ledgers.get(tp)
            if ledger is not None and ledger.done_through < cut.required_seq:
                return False
        return True


@dataclass(slots=True, frozen=True)
class CommittedPosition:
    """What a previous owner committed for a partition: where to resume and how to rebuild."""

    offset: int | None  # None: nothing committed yet
    fence: int
    snapshot: dict[str, Any] | None
    state_refs: tuple[tuple[int, int], ...] = ()  # records of a snapshot kept in the state topic, in order
    settings_id: str | None = None  # digest of the window settings of the commit (None: not recorded)
    settings: str | None = None  # their summary, for people
    # why the fence and snapshot of the commit were dropped (`resume`); None: this is the commit as made
    reset: str | None = None


def parse_metadata(offset: int | None, metadata: str | None) -> CommittedPosition:
    """Decode a commit's metadata; metadata not written by logstream means a plain resume. Metadata
    without window settings (written before they were recorded) has `settings_id` None."""
    if offset is None or offset < 0:
        return CommittedPosition(None, 0, None)
    if not metadata:
        return CommittedPosition(offset, offset, None)
    try:
        body = orjson.loads(metadata)
        if not isinstance(body, dict) or body.get("v") != METADATA_VERSION:
            raise ValueError("not logstream metadata")
        refs = body.get("state") or []
        if refs and not isinstance(refs[0], list):
            refs = [refs]  # one record: [partition, offset]
        settings_id, settings = body.get("settings_id"), body.get("settings")
        return CommittedPosition(
            offset,
            int(body.get("fence", offset)),
            body.get("snapshot"),
            tuple((int(ref[0]), int(ref[1])) for ref in refs),
            str(settings_id) if settings_id is not None else None,
            str(settings) if settings is not None else None,
        )
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError):
        return CommittedPosition(offset, offset, None)


def read_snapshot(settings: Settings, tp: TopicPartitionKey, committed: CommittedPosition) -> dict[str, Any] | None:
    """The windower snapshot a commit points at (its state records joined in order), checked against
    that commit; None (logged) when the records are gone or belong to another commit."""
    chunks = [read_record(settings, settings.resolved_state_topic, *ref) for ref in committed.state_refs]
    body = None
    if all(chunk is not None for chunk in chunks):
        try:
            body = orjson.loads(b"".join(chunk for chunk in chunks if chunk is not None))
        except orjson.JSONDecodeError:
            body = None
    expected = {"topic": tp[0], "partition": tp[1], "commit_offset": committed.offset, "fence": committed.fence}
    if not isinstance(body, dict) or any(body.get(key) != value for key, value in expected.items()):
        log.error("state_snapshot_missing", partition=f"{tp[0]}/{tp[1]}", ref=committed.state_refs,
                  found=None if body is None else {key: body.get(key) for key in expected},
                  consequence="open sessions replay as new windows")
        return None
    return body["snapshot"]


class CommitHost(Protocol):
    """The loop that owns the partitions, as `CommitPolicy` sees it. Every call is on the poll thread."""

    def take_cut(self) -> Cut | None:
        """Each owned partition's committable position now; None when nothing changed since its last commit."""

    def ledgers(self) -> Mapping[TopicPartitionKey, OutputLedger]:
        """The output ledger of each partition owned now."""

    def pump(self) -> None:
        """Collect finished work and publish it; raises FatalPipelineError on a fatal condition. Non-blocking."""

    def wait(self, seconds: float) -> None:
        """Block up to `seconds` for work in progress (waiting for a cut to complete)."""

    def committed(self, parts: Mapping[TopicPartitionKey, PartitionCut]) -> None:
        """A cut is committed for these partitions (still owned): outputs held back may go now."""

    def rewound(self, tp: TopicPartitionKey, position: CommittedPosition) -> int | None:
        """Forget `tp`'s state since its last commit and rebuild it from `position`.

        Returns the offset to read next (None: the beginning); the policy seeks the consumer there."""


class CommitPolicy:
    """When a cut is taken, when it is complete, how it is committed, and recovery from failed commits.

    Owns the producer whose records the commits cover: in exactly-once mode it is transactional, its
    start (`init_transactions`, retried while the coordinator is unreachable) fences any earlier
    instance with the same transactional id, and one transaction is open at all times. Outputs the
    host issues after a pending cut must not enter the transaction that commits it (`holds`).
    Not thread-safe: used on the poll thread only.
    """

    def __init__(self, settings: Settings, host: CommitHost, producer_config: dict[str, Any],
                 stop_event: threading.Event) -> None:
        self.settings = settings
        self.exactly_once = settings.guarantee == "exactly-once"
        self.interval_s = settings.commit_interval_s
        self.host = host
        self.pending: Cut | None = None
        self.commits = 0
        self._producer_config = producer_config
        self._stop_event = stop_event
        self._last_cut_at = time.monotonic()
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, consumer: Consumer) -> Producer:
        """Create the producer (exactly-once: fence earlier instances, open a transaction)."""
        self.consumer = consumer
        self.producer = self._new_producer()
        return self.producer

    def close(self, clean: bool) -> None:
        """Flush the producer; after an unclean stop in exactly-once mode, abort the open transaction first.

        Never raises a Kafka error: a fenced or broken producer (nothing more can be written) is
        `FatalPipelineError` with the operator's sentence; any other failure is logged.
        """
        if self.producer is None:
            return
        try:
            if self.exactly_once and not clean:
                try:
                    self.producer.abort_transaction(KAFKA_CALL_TIMEOUT_S)
                except KafkaException as exc:
                    if is_fatal(exc.args[0]):
                        raise
                    log.warning("transaction_abort_failed", error=str(exc.args[0]), action="closing anyway")
            self.producer.flush(KAFKA_CALL_TIMEOUT_S)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if is_fatal(error):
                raise self._fatal(error) from None
            log.warning("producer_flush_failed", error=str(error))

    @property
    def transactional_id(self) -> str | None:
        """The producer's transactional id (None: at-least-once)."""
        return self._producer_config.get("transactional.id")

    def fatal_reason(self, error: KafkaError) -> str:
        """The operator's line for a fatal error of this loop's clients (`kafka.fatal_reason`, with the
        producer's transactional id: a fence names who took over)."""
        return fatal_reason(error, self.settings, self.transactional_id)

    def _fatal(self, error: KafkaError) -> FatalPipelineError:
        """The error that stops the process for a fatal producer error."""
        return FatalPipelineError(self.fatal_reason(error))

    def _new_producer(self) -> Producer:
        producer = kafka_client(Producer, self._producer_config)
        if not self.exactly_once:
            return producer
        while True:  # the coordinator may be unreachable for a while (broker outage): keep trying
            try:
                producer.init_transactions(KAFKA_CALL_TIMEOUT_S)
                break
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if is_fatal(error):
                    raise self._fatal(error) from None
                if self._stop_event.is_set():
                    raise FatalPipelineError(f"cannot start the transactional producer: {error.str()}") from None
                log.warning("producer_init_retry", error=str(exc))
        producer.begin_transaction()
        return producer

    # --- cuts -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Each loop iteration: take a cut when the interval has passed, commit the pending one once complete."""
        if self.pending is None and time.monotonic() - self._last_cut_at >= self.interval_s:
            self.cut_now()
        if self.pending is not None and self.pending.complete(self.host.ledgers()):
            self.commit(self.pending)

    def cut_now(self) -> None:
        """Take a cut now (committed by `tick` once its outputs are done)."""
        self._last_cut_at = time.monotonic()
        self.pending = self.host.take_cut()

    def holds(self, tp: TopicPartitionKey, seq: int) -> bool:
        """Exactly-once: output `seq` of `tp` came after the pending cut and must wait for its commit.

        A partition the cut leaves out (nothing read when it was taken, or nothing new since its last
        commit) holds every output until then: the cut's transaction commits no offset of it, so an
        output of it inside that transaction would be published again by the replay after a crash."""
        if not self.exactly_once or self.pending is None:
            return False
        part = self.pending.partitions.get(tp)
        return part is None or seq > part.required_seq

    def forget(self, tps: set[TopicPartitionKey]) -> None:
        """Partitions no longer owned leave the pending cut."""
        if self.pending is not None:
            for tp in tps:
                self.pending.partitions.pop(tp, None)

    def complete_now(self, deadline: float) -> None:
        """Commit a cut covering everything closed so far, waiting until `deadline` (monotonic seconds).

        A cut still incomplete at the deadline is dropped (exactly-once: its transaction is aborted
        and the partitions replay from their last commit)."""
        if self.pending is not None:
            self._wait_for_cut(deadline)
        if self.pending is None:
            self.cut_now()
            if self.pending is not None:
                self._wait_for_cut(deadline)
        if self.pending is not None:
            log.warning("cut_not_committed", reason="deadline", partitions=len(self.pending.partitions))
            if self.exactly_once:
                self.abort_and_rewind()
            self.pending = None

    def _wait_for_cut(self, deadline: float) -> None:
        """Until the pending cut is complete and committed, or `deadline`. Waits only for what is missing: a
        cut already complete is committed at once (a `poll` with a timeout would wait it out when no
        delivery report is due), windows still scoring are waited for, outputs on their way until the
        next delivery report."""
        assert self.pending is not None and self.producer is not None
        while time.monotonic() < deadline:
            self.host.pump()
            self.producer.poll(0)  # the delivery reports already in: they complete the cut's outputs
            if self.pending.complete(self.host.ledgers()):
                if self.commit(self.pending) or self.pending is None:
                    return
                time.sleep(0.2)
                continue
            self.host.wait(0.02)  # windows still being scored: until the scorer is idle
            self.producer.poll(0.02 if len(self.producer) else 0.001)  # outputs on their way: the next report

    # --- committing -----------------------------------------------------------------------------

    def commit(self, cut: Cut) -> bool:
        """Commit a complete cut; False when the broker did not take it (a later cut retries)."""
        assert self.consumer is not None and self.producer is not None
        owned = self.host.ledgers()
        live = {tp: part for tp, part in cut.partitions.items() if tp in owned}
        offsets: list[TopicPartition] = []
        try:
            if self.exactly_once:
                self.producer.flush(KAFKA_CALL_TIMEOUT_S)  # state records get their offsets
                offsets = _offsets(live)
                if offsets:
                    self.producer.send_offsets_to_transaction(
                        offsets, self.consumer.consumer_group_metadata(), KAFKA_CALL_TIMEOUT_S
                    )
                self.producer.commit_transaction(KAFKA_CALL_TIMEOUT_S)
                self.producer.begin_transaction()
            else:
                offsets = _offsets(live)
                if offsets:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            return self._on_commit_error(exc)
        self.pending = None
        self.commits += 1
        log.debug("committed", offsets={f"{tp.topic}/{tp.partition}": tp.offset for tp in offsets})
        self.host.committed(live)
        return True

    def _on_commit_error(self, exc: KafkaException) -> bool:
        error: KafkaError = exc.args[0]
        if is_fatal(error):
            raise self._fatal(error) from None
        if self.exactly_once and error.txn_requires_abort():
            log.warning("transaction_aborted", error=str(error))
            self.abort_and_rewind()
            return False
        log.warning("commit_failed", error=str(error), retriable=error.retriable())
        if not self.exactly_once:
            self.pending = None  # a fresh cut at the next interval supersedes it
        return False

    # --- recovery -------------------------------------------------------------------------------

    def abort_and_rewind(self) -> None:
        """Exactly-once recovery: abort the open transaction and replay every partition from its commit."""
        assert self.producer is not None
        try:
            self.producer.abort_transaction(KAFKA_CALL_TIMEOUT_S)
            self.producer.begin_transaction()
        except KafkaException as exc:
            if is_fatal(exc.args[0]):
                raise self._fatal(exc.args[0]) from None
            log.warning("transaction_abort_failed", error=str(exc), action="replacing the producer")
            self.replace_producer()
        self.pending = None
        self.rewind(set(self.host.ledgers()))

    def on_lost(self, lost: set[TopicPartitionKey]) -> None:
        """Partitions lost without a revoke: nothing of theirs is committed. Exactly-once: our group
        generation is gone (session expired, broker outage), so the open transaction can never commit;
        a fresh transactional producer aborts it for certain (the old one's coordinator state may not
        have survived the outage), and the partitions still owned replay from their last commit."""
        if self.exactly_once:
            self.replace_producer()
            self.rewind(set(self.host.ledgers()) - lost)

    def replace_producer(self) -> None:
        """Drop the transactional producer (its open transaction with it) and start a fresh one.

        A fenced producer is not replaced (a fresh one would fence the instance that took over in
        turn): `FatalPipelineError`."""
        assert self.producer is not None
        try:
            self.producer.purge(in_queue=True, in_flight=True, blocking=False)
            self.producer.flush(0)
        except KafkaException as exc:
            if is_fatal(exc.args[0]):
                raise self._fatal(exc.args[0]) from None
        self.producer = self._new_producer()
        self.pending = None

    def rewind(self, tps: set[TopicPartitionKey]) -> None:
        """Forget everything since the last commit of these partitions and read them again from it."""
        assert self.consumer is not None
        if not tps:
            return
        committed = self.consumer.committed([TopicPartition(*tp) for tp in tps], timeout=KAFKA_CALL_TIMEOUT_S)
        for tp in committed:
            start = self.host.rewound((tp.topic, tp.partition), parse_metadata(tp.offset, tp.metadata))
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, start if start is not None else OFFSET_BEGINNING))
        log.warning("partitions_rewound", partitions=sorted(f"{t}/{p}" for t, p in tps))


def close_clients(policy: CommitPolicy, consumer: Consumer | None, clean: bool) -> str | None:
    """Close a consume -> produce -> commit loop's clients: flush (or abort) the policy's producer, then
    leave the group (which runs the revoke callback).

    Never raises a Kafka error: returns the fatal reason met on the way (the producer fenced while it
    flushed, the member fenced, a revoke's commit refused), None when both closed cleanly.
    """
    problem: str | None = None
    try:
        policy.close(clean)
    except (FatalPipelineError, SystemError) as exc:  # SystemError: a fatal error lost in flush
        if (problem := stop_reason(exc, policy.fatal_reason)) is None:
            raise
    if consumer is None:
        return problem
    try:
        consumer.close()
    except (FatalPipelineError, KafkaException) as exc:  # FatalPipelineError: from a rebalance callback close ran
        reason = stop_reason(exc, policy.fatal_reason)
        if reason is None:
            log.warning("consumer_close_failed", error=str(exc.args[0]))
        else:
            problem = problem or reason
    return problem


def _offsets(parts: Mapping[TopicPartitionKey, PartitionCut]) -> list[TopicPartition]:
    return [TopicPartition(t, p, part.commit_offset, metadata=part.metadata()) for (t, p), part in parts.items()]
