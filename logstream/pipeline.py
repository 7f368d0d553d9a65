"""The consumer: raw topic -> parse -> window -> score -> publish -> commit.

Threads: the poll loop (this module) owns the Kafka consumer and producer and all per-partition
state; the scoring thread (`scoring.ScoringWorker`) owns the detector. The poll loop never blocks on
the detector: it submits closed windows, collects verdicts each iteration, and pauses its partitions
while too many windows are in flight (backpressure), so it keeps polling within max.poll.interval.

Per partition (`PartitionState`): the windowing engine, the next offset to read, the replay fence,
and the ledger of outputs (alerts, dead-letter records) not yet acknowledged. Offsets are committed
by cuts (see `checkpoint`): never past the oldest open window, never before the outputs of the lines
below the cut are acknowledged (at-least-once) or committed in the same transaction (exactly-once).

Lifecycle:
  - assign: read the committed offset and its metadata; rebuild open sessions from the replay;
  - revoke: score and publish what is closed, commit a final cut (bounded wait), drop the state;
    the next owner replays the open windows from the committed offset;
  - lost: drop the state, commit nothing (exactly-once: abort the open transaction);
  - SIGTERM: stop reading, finish in-flight scoring within the shutdown timeout, publish, commit, leave;
  - `--once`: read to the end offsets as of assignment, close every window, publish, commit, exit 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from logstream import __version__
from logstream.alerts import OutputTooLarge, build_alert, encode_alert, severity
from logstream.checkpoint import CommittedPosition, Cut, OutputLedger, PartitionCut, parse_metadata
from logstream.coverage import CoverageMonitor
from logstream.detectors.base import Detector
from logstream.assignment import AssignmentWatch, check_assignment
from logstream.deadletters import DeadLetterWatch
from logstream.kafka import (
    RECORD_OVERHEAD_BYTES,
    base_config,
    consumer_config,
    ensure_topics,
    producer_config,
    read_record,
    require_topics,
    wait_for_broker,
)
from logstream.errors import KafkaSetupError
from logstream.logs import LogThrottle, get_logger
from logstream.metrics import Health, Metrics
from logstream.outputs import MAX_ERROR_CHARS, MAX_KEY_BYTES, STATE_CHUNK_BYTES, OutputLimits, output_limits
from logstream.parsing import BadRecord, LineParser
from logstream.records import LogLine, Window
from logstream.repartition import BLOCKS_HEADER, COPY_HEADER
from logstream.scoring import ScoreJob, ScoreResult, ScoringWorker
from logstream.settings import Settings
from logstream.windows import CountWindower, make_windower

log = get_logger(__name__)

TP = tuple[str, int]
CONSUME_BATCH = 500
REBALANCE_DRAIN_S = 10.0
KAFKA_CALL_TIMEOUT_S = 10.0


class FatalPipelineError(RuntimeError):
    """The process must stop without committing more (a lost delivery, a fenced producer)."""


@dataclass(slots=True)
class Output:
    """One record to publish on behalf of an input partition."""

    tp: TP
    seq: int
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    severity: str | None = None
    cut: PartitionCut | None = None  # set for state records: their position goes into the commit
    chunk: int = 0  # which record of a state snapshot split over several


class PartitionState:
    """Everything logstream holds for one assigned input partition; dropped on revoke or loss."""

    def __init__(self, tp: TP, windower: Any, epoch: int, committed: CommittedPosition, metrics: Metrics) -> None:
        self.tp = tp
        self.windower = windower
        self.epoch = epoch
        self.position: int | None = committed.offset  # next offset to read
        self.origin: int | None = committed.offset  # where this ownership started reading
        self.fence = committed.fence  # below it, side effects were done by an earlier owner
        self.ledger = OutputLedger()
        self.held: list[Output] = []
        self.last_committed: tuple[int, int] | None = (
            (committed.offset, committed.fence) if committed.offset is not None else None
        )
        self.end_at_start: int | None = None
        self.eof = False
        self.last_line_at = time.monotonic()  # when a line last joined the windows (idle close)
        self.idle_held: list[Window] = []  # closed by an idle cut; published once the cut is committed
        self.idle_cut_at: int | None = None  # offset of the last line before that cut
        topic, partition = tp
        self.lines_counter = metrics.lines_consumed.labels(topic, str(partition))
        self.replay_counter = metrics.lines_replayed.labels(topic, str(partition))
        self.open_gauge = metrics.open_windows.labels(topic, str(partition))

    @property
    def caught_up(self) -> bool:
        if self.eof:
            return True
        return self.end_at_start is not None and self.position is not None and self.position >= self.end_at_start


class Pipeline:
    """One consumer-group member running the whole consume -> publish -> commit loop."""

    def __init__(
        self,
        settings: Settings,
        detector: Detector,
        *,
        metrics: Metrics | None = None,
        health: Health | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        if not settings.input_topic:
            raise ValueError("at least one --input-topic is required")
        self.settings = settings
        self.detector = detector
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.stop_event = stop_event or threading.Event()
        self.parser = LineParser(settings.format, settings.max_line_bytes)
        self.exactly_once = settings.guarantee == "exactly-once"
        self._session_windows = settings.window == "session"
        self.parts: dict[TP, PartitionState] = {}
        self._epoch = 0
        self._assigned_once = False
        self._paused = False
        self._pending_cut: Cut | None = None
        self._last_cut_at = time.monotonic()
        self._last_lag_at = 0.0
        self._fatal: str | None = None
        self._error_log = LogThrottle(10.0)
        self._assignment = AssignmentWatch(settings.input_topic, settings.effective_assignment_timeout_s)
        self._dead_letters = DeadLetterWatch(self.metrics, settings.format, settings.window)
        self._last_health_at = 0.0
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        # lowered at start to what the output topics take (outputs.output_limits)
        self.limits = OutputLimits(settings.alert_max_bytes, settings.dlq_max_bytes, STATE_CHUNK_BYTES)
        self.scorer = ScoringWorker(
            detector,
            batch_size=settings.batch_size,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            on_batch=self._observe_batch,
            coverage=CoverageMonitor.for_detector(detector, on_share=self._observe_coverage,
                                                  on_warning=self.metrics.unseen_template_warnings.inc),
        )

    # ==========================================================================================
    # lifecycle
    # ==========================================================================================

    def run(self) -> int:
        """Run until stopped (or, with `once`, until the input is consumed). Returns the exit code."""
        settings = self.settings
        # Kafka must answer, and a batch run's input must exist, before anything starts (one clear error).
        try:
            metadata = wait_for_broker(base_config(settings), settings.connect_timeout_s)
            if settings.once:
                require_topics(metadata, list(settings.input_topic), settings.bootstrap_servers)
        except KafkaSetupError:
            self.detector.close()
            raise
        for topic in settings.input_topic:
            if topic not in metadata.topics:
                log.warning("input_topic_missing", topic=topic, action="waiting: it is consumed within seconds of "
                            "being created")
        if settings.create_topics:
            ensure_topics(
                settings,
                {
                    settings.alerts_topic: {"max.message.bytes": str(settings.alert_max_bytes + RECORD_OVERHEAD_BYTES)},
                    settings.dlq_topic: {"max.message.bytes": str(settings.dlq_max_bytes + RECORD_OVERHEAD_BYTES)},
                    settings.resolved_state_topic: {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000",
                                                    "max.message.bytes": str(STATE_CHUNK_BYTES + RECORD_OVERHEAD_BYTES)},
                },
            )
        self.limits = output_limits(settings)
        self.producer = self._new_producer()
        self.consumer = Consumer({**consumer_config(settings), "error_cb": self._on_kafka_error})
        self.scorer.start()
        self.consumer.subscribe(
            list(settings.input_topic), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._assignment = AssignmentWatch(settings.input_topic, settings.effective_assignment_timeout_s)
        log.info(
            "pipeline_started",
            topics=settings.input_topic,
            group=settings.group_id,
            detector=self.detector.name,
            window=settings.window,
            guarantee=settings.guarantee,
            once=settings.once,
        )
        code = 1  # an exception out of the loop is not a clean stop
        try:
            code = self._loop()
        except FatalPipelineError as exc:
            log.error("pipeline_fatal", error=str(exc))
            code = 2
        finally:
            self._close(clean=code == 0)
        return code

    def _new_producer(self) -> Producer:
        """A producer; in exactly-once mode its init fences (and aborts the transaction of) any earlier one."""
        producer = Producer({**producer_config(self.settings), "error_cb": self._on_kafka_error})
        if not self.exactly_once:
            return producer
        while True:  # the coordinator may be unreachable for a while (broker outage): keep trying
            try:
                producer.init_transactions(KAFKA_CALL_TIMEOUT_S)
                break
            except KafkaException as exc:
                if exc.args[0].fatal() or self.stop_event.is_set():
                    raise FatalPipelineError(f"cannot start the transactional producer: {exc}") from exc
                log.warning("producer_init_retry", error=str(exc))
        producer.begin_transaction()
        return producer

    def _loop(self) -> int:
        assert self.consumer is not None
        while True:
            if self._fatal:
                raise FatalPipelineError(self._fatal)
            if self.stop_event.is_set():
                self._shutdown(deadline=time.monotonic() + self.settings.shutdown_timeout_s)
                return 0
            # Never read more records than there is room for windows: keeps the in-flight bound tight.
            room = self.settings.queue_max_windows - self._in_flight()
            messages = self.consumer.consume(min(CONSUME_BATCH, max(1, room)), 0.1)
            self.health.last_poll = time.time()
            if messages:
                self._handle_messages(messages)
            self._collect_results()
            self._apply_backpressure()
            self._close_idle_windows()
            self._maybe_checkpoint()
            self._update_lag()
            self._observe_health()
            if self.settings.once and self._once_done():
                self._finish_input()
                return 0

    def _shutdown(self, deadline: float) -> None:
        """SIGTERM: stop reading, finish what is in flight, publish, commit. Open windows are replayed later."""
        log.info("shutdown_started", in_flight=self.scorer.in_flight)
        self._pause_all()
        self.scorer.flush_partial(True)
        self._complete_now(deadline)
        self._dead_letters.evaluate(final=True)

    def _finish_input(self) -> None:
        """`--once`: close every window, score and publish them all, commit the end offsets."""
        for state in self.parts.values():
            self._submit(state, state.windower.flush())
            state.open_gauge.set(0)
        self.scorer.flush_partial(True)
        self._complete_now(deadline=math.inf)
        self._dead_letters.evaluate(final=True)
        log.info("input_finished", partitions=len(self.parts))

    def _close(self, clean: bool) -> None:
        self.scorer.stop()
        if self.producer is not None:
            if self.exactly_once and not clean:
                try:
                    self.producer.abort_transaction(KAFKA_CALL_TIMEOUT_S)
                except KafkaException:
                    pass
            self.producer.flush(KAFKA_CALL_TIMEOUT_S)
        if self.consumer is not None:
            self.consumer.close()
        self.detector.close()
        log.info("run_summary", **self.metrics.summary())
        log.info("pipeline_stopped", clean=clean)

    # ==========================================================================================
    # rebalance callbacks (run inside consumer.consume on the poll thread)
    # ==========================================================================================

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_once = True
        self._assignment.on_assign(tp.topic for tp in partitions)
        self.health.waiting_for = None
        if not partitions:
            self.health.assigned = bool(self.parts)
            return
        self.metrics.rebalances.labels("assign").inc()
        committed = consumer.committed(partitions, timeout=KAFKA_CALL_TIMEOUT_S)
        for tp in committed:
            self._adopt((tp.topic, tp.partition), parse_metadata(tp.offset, tp.metadata))
        if self._paused:
            consumer.pause(partitions)
        self.metrics.assigned_partitions.set(len(self.parts))
        self.health.assigned = True
        log.info(
            "partitions_assigned",
            partitions=[f"{tp.topic}/{tp.partition}@{tp.offset}" for tp in committed],
            owned=len(self.parts),
        )

    def _adopt(self, tp: TP, committed: CommittedPosition) -> PartitionState:
        """Create the state of a partition we now own, rebuilding open sessions where needed."""
        assert self.consumer is not None
        s = self.settings
        self._epoch += 1
        windower = make_windower(
            s.window, tp[0], tp[1], size=s.window_size, stride=s.stride, gap=s.effective_session_gap,
            grace=s.session_grace, max_lines=s.session_max_lines, max_open=s.session_max_open,
            max_future=s.future_bound(s.effective_session_gap), future_policy=s.future_policy,
            future_confirm=s.future_confirm_lines,
        )
        state = PartitionState(tp, windower, self._epoch, committed, self.metrics)
        self.parser.forget(*tp)  # inherited line times start afresh, as in a fresh consumer: replays agree
        snapshot = committed.snapshot
        if committed.state_refs:
            snapshot = self._read_snapshot(tp, committed)
        if snapshot is not None and committed.offset is not None:
            windower.restore(snapshot, committed.fence)
        if s.once:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=KAFKA_CALL_TIMEOUT_S)
            state.end_at_start = high
            if high <= max(low, committed.offset or 0):
                state.eof = True
        self.parts[tp] = state
        return state

    def _read_snapshot(self, tp: TP, committed: CommittedPosition) -> dict[str, Any] | None:
        """The windower snapshot a commit points at (its records joined in order), checked against that commit."""
        s = self.settings
        chunks = [read_record(s, s.resolved_state_topic, *ref) for ref in committed.state_refs]
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

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions} & set(self.parts)
        if not revoked:
            return
        self.metrics.rebalances.labels("revoke").inc()
        log.info("partitions_revoked", partitions=sorted(f"{t}/{p}" for t, p in revoked))
        self.scorer.flush_partial(True)
        self._complete_now(time.monotonic() + min(REBALANCE_DRAIN_S, self.settings.shutdown_timeout_s))
        self.scorer.flush_partial(False)
        self._drop(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions} & set(self.parts)
        self.metrics.rebalances.labels("lost").inc()
        log.warning("partitions_lost", partitions=sorted(f"{t}/{p}" for t, p in lost))
        if self.exactly_once:
            # Our group generation is gone (session expired, broker outage): the open transaction
            # can never commit. A fresh transactional producer aborts it for certain, where the old
            # one's coordinator state may not have survived the outage.
            self._replace_producer()
            self._rewind(set(self.parts) - lost)
        self._drop(lost)

    def _drop(self, tps: set[TP]) -> None:
        for tp in tps:
            state = self.parts.pop(tp, None)
            if state is not None:
                state.open_gauge.set(0)
            self.metrics.forget_partition(*tp)
            self._dead_letters.forget(tp)
        self.scorer.drop(lambda job: (job.window.topic, job.window.partition) not in tps)
        if self._pending_cut is not None:
            for tp in tps:
                self._pending_cut.partitions.pop(tp, None)
        self.metrics.assigned_partitions.set(len(self.parts))
        self.health.assigned = bool(self.parts)

    # ==========================================================================================
    # consuming
    # ==========================================================================================

    def _handle_messages(self, messages: list[Message]) -> None:
        counts: dict[TP, int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_consume_error(message, error)
                continue
            tp = (message.topic(), message.partition())
            state = self.parts.get(tp)
            if state is None:
                continue  # a message fetched just before its partition was revoked
            counts[tp] = counts.get(tp, 0) + 1
            self._handle_record(state, message)
        for tp, n in counts.items():
            self._dead_letters.read(tp, n)
            state = self.parts.get(tp)
            if state is not None:
                state.lines_counter.inc(n)
                state.open_gauge.set(state.windower.open_windows)

    def _on_consume_error(self, message: Message, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            state = self.parts.get((message.topic(), message.partition()))
            if state is not None:
                state.eof = True
            return
        if error.fatal() or error.code() == KafkaError._FATAL:
            self._fatal = f"consumer fenced or broken: {error}"  # e.g. a newer instance took our static id
            return
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            topic = message.topic()
            if self.settings.once:  # checked at start: it was deleted while this batch run read it
                self._fatal = f"input topic {topic!r} disappeared from {self.settings.bootstrap_servers}"
                return
            if self._error_log.allow(f"missing:{topic}", time.monotonic()) is not None:
                log.warning("input_topic_missing", topic=topic, action="waiting: it is consumed within seconds of "
                            "being created")
            return
        suppressed = self._error_log.allow(f"consume:{error.name()}", time.monotonic())
        if suppressed is not None:
            log.warning("consume_error", error=str(error), suppressed_since_last=suppressed)

    def _handle_record(self, state: PartitionState, message: Message) -> None:
        offset = message.offset()
        state.position = offset + 1
        state.eof = False
        if state.origin is None:
            state.origin = offset
        replay = offset < state.fence
        if replay:
            state.replay_counter.inc()
        copy = self._is_copy(message)
        if copy and not self._session_windows:
            return  # a multi-block line counts once, in its primary copy (see repartition.route)
        topic, partition = state.tp
        try:
            line = self.parser.parse(
                message.value(), topic=topic, partition=partition, offset=offset,
                record_time=message.timestamp()[1] / 1000.0,
            )
        except BadRecord as exc:
            if copy:
                return  # dead-lettered once, from the primary copy
            self.metrics.parse_errors.labels(exc.reason).inc()
            if not replay:
                self._dead_letter(state, message, exc.reason, exc.detail)
            return
        if self._session_windows:
            line = self._routed_blocks(message, line)
        result = state.windower.add(line, message.timestamp()[1] / 1000.0)
        if result.future or result.clamped:
            self._count_future(state, message, line, result.future, replay)
            if result.future:
                return
        state.last_line_at = time.monotonic()
        if not replay:
            if result.opened:
                self.metrics.windows_opened.labels(self.settings.window).inc(result.opened)
            if result.joined == 0:
                reason = "late" if result.late_keys else "unkeyed"
                detail = f"late for {', '.join(result.late_keys)}" if result.late_keys else "no block id in line"
                self._dead_letter(state, message, reason, detail)
            if result.late_keys:
                self.metrics.late_lines.inc(len(result.late_keys))
                log.info("late_line", partition=f"{topic}/{partition}", offset=offset, keys=list(result.late_keys))
        if result.closed:
            if replay:
                log.warning("replayed_window_suppressed", partition=f"{topic}/{partition}", offset=offset,
                            windows=len(result.closed))
            else:
                self._submit(state, result.closed)

    @staticmethod
    def _is_copy(message: Message) -> bool:
        """A second copy of a line naming blocks on several partitions (`produce --key block`, `repartition`)."""
        headers = message.headers()
        return bool(headers) and any(name == COPY_HEADER for name, _ in headers)

    @staticmethod
    def _routed_blocks(message: Message, line: LogLine) -> LogLine:
        """A line routed by block id (`repartition`, `produce --key block`) belongs only to the blocks routed here."""
        headers = message.headers()
        if not headers:
            return line
        for name, value in headers:
            if name == BLOCKS_HEADER:
                return dataclasses.replace(line, block_ids=tuple(value.decode().split(",")) if value else ())
        return line

    def _count_future(self, state: PartitionState, message: Message, line: LogLine, refused: bool,
                      replay: bool) -> None:
        """A line from a clock far ahead of its partition's stream: dead-lettered (refused) or clamped."""
        if replay:
            return  # decided, counted and dead-lettered before the restart
        self.metrics.future_lines.labels("dead-letter" if refused else "clamp").inc()
        topic, partition = state.tp
        bound = self.settings.future_bound(self.settings.effective_session_gap)
        ahead = f"event time {line.event_time:.3f} more than {bound:g} s ahead of stream time"
        log.info("future_line", partition=f"{topic}/{partition}", offset=message.offset(), refused=refused)
        if refused:
            self._dead_letter(state, message, "future_timestamp", ahead)

    def _close_idle_windows(self) -> None:
        """Count windows of a partition quiet for --window-idle-s close (reason idle) after their last line.

        The cut goes into the next commit's metadata before its windows are published (they are held
        until then), with the fence at the cut's line: a replay from an earlier commit cuts at the
        same line and publishes them, so a restart sees the same windows with the same ids.
        """
        idle_s = self.settings.window_idle_s
        if not idle_s or self._session_windows or self.settings.once or self._pending_cut is not None:
            return
        now = time.monotonic()
        cut = False
        for state in self.parts.values():
            if state.idle_held or not state.eof or not state.windower.open_windows:
                continue
            if now - state.last_line_at < idle_s:
                continue
            state.idle_cut_at = state.windower.last_offset
            state.idle_held = state.windower.cut()
            state.open_gauge.set(state.windower.open_windows)
            cut = True
        if cut:
            self._pending_cut = self._take_cut()

    def _release_idle(self, tps: Any) -> None:
        """A committed cut recorded the idle cuts: their windows may be judged and published now."""
        for tp in tps:
            state = self.parts.get(tp)
            if state is not None and state.idle_held:
                held, state.idle_held, state.idle_cut_at = state.idle_held, [], None
                self._submit(state, held)

    def _submit(self, state: PartitionState, windows: list[Window]) -> None:
        for window in windows:
            self.metrics.windows_closed.labels(window.kind, window.close_reason).inc()
            self.scorer.submit(ScoreJob(window, state.epoch, state.ledger.issue()))

    # ==========================================================================================
    # publishing
    # ==========================================================================================

    def _collect_results(self) -> None:
        for result in self.scorer.take_results():
            self._publish_result(result)
        if self.producer is not None:
            self.producer.poll(0)

    def _publish_result(self, result: ScoreResult) -> None:
        job = result.job
        window = job.window
        state = self.parts.get((window.topic, window.partition))
        if state is None or state.epoch != job.epoch:
            return  # the partition moved (or was rewound) since: the next owner replays this window
        if result.verdict is None:
            self.metrics.scoring_errors.inc()
            body = {
                "window_id": window.window_id, "key": window.key[:MAX_KEY_BYTES], "first_offset": window.first_offset,
                "last_offset": window.last_offset, "error": (result.error or "")[:MAX_ERROR_CHARS],
            }
            self._emit(Output(state.tp, job.seq, self.settings.dlq_topic, window.key.encode(), orjson.dumps(body),
                              self._headers(window.topic, window.partition, window.first_offset, "detector_error",
                                            result.error or "")))
            self.metrics.dlq_records.labels("detector_error").inc()
            return
        self.metrics.verdicts.labels("anomalous" if result.verdict.anomalous else "normal").inc()
        if not result.verdict.anomalous and self.settings.emit == "anomalous":
            state.ledger.complete(job.seq)  # judged normal: nothing to publish
            return
        alert = build_alert(window, result.verdict, self.detector.name, self.detector.version)
        try:
            value, truncated = encode_alert(alert, self.limits.alert)
        except OutputTooLarge as exc:
            self._output_too_large(state, job.seq, window, str(exc))
            return
        if truncated:
            self.metrics.outputs_truncated.labels("alert").inc()
            log.info("alert_truncated", alert_id=alert["alert_id"], parts=truncated, bytes=len(value),
                     limit=self.limits.alert)
        self._emit(Output(state.tp, job.seq, self.settings.alerts_topic, window.key.encode()[:MAX_KEY_BYTES], value,
                          severity=severity(result.verdict)))

    def _output_too_large(self, state: PartitionState, seq: int, window: Window, error: str) -> None:
        """An alert that cannot fit even at its minimum: a small dead-letter record names the window instead."""
        body = {"window_id": window.window_id, "first_offset": window.first_offset,
                "last_offset": window.last_offset, "error": error[:MAX_ERROR_CHARS]}
        self.metrics.dlq_records.labels("output_too_large").inc()
        self._emit(Output(state.tp, seq, self.settings.dlq_topic, window.key.encode()[:MAX_KEY_BYTES],
                          orjson.dumps(body), self._headers(window.topic, window.partition, window.first_offset,
                                                            "output_too_large", error)))

    def _dead_letter(self, state: PartitionState, message: Message, reason: str, detail: str) -> None:
        self.metrics.dlq_records.labels(reason).inc()
        self._dead_letters.dead(state.tp, reason, detail, message.offset())
        headers = self._headers(message.topic(), message.partition(), message.offset(), reason, detail)
        value = message.value() or b""
        if len(value) > self.limits.dlq:  # the broker would refuse it: keep the head, say so
            headers.append(("logstream.original-size", str(len(value)).encode()))
            value = value[: self.limits.dlq]
            self.metrics.outputs_truncated.labels("dead_letter").inc()
        key = message.key()
        if key is not None and len(key) > MAX_KEY_BYTES:
            headers.append(("logstream.original-key-size", str(len(key)).encode()))
            key = key[:MAX_KEY_BYTES]
        self._emit(Output(state.tp, state.ledger.issue(), self.settings.dlq_topic, key, value, headers))

    @staticmethod
    def _headers(topic: str, partition: int, offset: int, reason: str, detail: str) -> list[tuple[str, bytes]]:
        return [
            ("logstream.reason", reason.encode()),
            ("logstream.detail", detail[:1000].encode()),
            ("logstream.source.topic", topic.encode()),
            ("logstream.source.partition", str(partition).encode()),
            ("logstream.source.offset", str(offset).encode()),
            ("logstream.version", __version__.encode()),
        ]

    def _emit(self, output: Output) -> None:
        """Publish now, or hold it (exactly-once) while a pending cut's transaction must not include it."""
        state = self.parts[output.tp]
        cut = self._pending_cut.partitions.get(output.tp) if self._pending_cut else None
        if self.exactly_once and cut is not None and output.seq > cut.required_seq:
            state.held.append(output)
            return
        self._produce(state, output)

    def _produce(self, state: PartitionState, output: Output) -> None:
        assert self.producer is not None
        callback = functools.partial(self._delivered, state.tp, state.epoch, output)
        while True:
            try:
                self.producer.produce(output.topic, output.value, output.key, headers=output.headers,
                                      on_delivery=callback)
                break
            except BufferError:
                self.producer.poll(0.1)  # local queue full: let deliveries drain
        if self.exactly_once and output.cut is None:
            state.ledger.complete(output.seq)  # part of the open transaction: done when it commits
        if output.severity is not None:
            self.metrics.alerts_published.labels(output.severity).inc()

    def _delivered(self, tp: TP, epoch: int, output: Output, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            if self.exactly_once and self._fatal is None and error.code() == KafkaError._PURGE_QUEUE:
                return  # an aborted transaction's records: the rewind re-produces them
            if self._refused_as_too_large(tp, epoch, output, error):
                return
            self._fatal = f"delivery to {output.topic} failed: {error}"
            return
        self.health.broker_ok = True
        if output.cut is not None:
            output.cut.state_refs[output.chunk] = (message.partition(), message.offset())
        elif self.exactly_once:
            return  # completed when produced into the transaction
        state = self.parts.get(tp)
        if state is not None and state.epoch == epoch:
            state.ledger.complete(output.seq)

    def _refused_as_too_large(self, tp: TP, epoch: int, output: Output, error: KafkaError) -> bool:
        """The broker refused an alert or dead letter as too large (its topic's limit was lowered since
        start): replace it by a small dead-letter record naming it, instead of stopping on it forever.
        Exactly-once cannot: the refusal fails the open transaction, which is fatal."""
        if error.code() != KafkaError.MSG_SIZE_TOO_LARGE or self.exactly_once or output.cut is not None:
            return False
        state = self.parts.get(tp)
        if state is None or state.epoch != epoch:
            return True  # the partition moved: its next owner replays it
        if output.topic == self.settings.dlq_topic and output.value == b"":
            return False  # even the smallest record is refused: nothing more to shed
        reason = "output_too_large"
        headers = [(name, value) for name, value in output.headers or [] if name != "logstream.reason"]
        headers = [("logstream.reason", reason.encode()), *headers,
                   ("logstream.refused-topic", output.topic.encode()),
                   ("logstream.refused-size", str(len(output.value)).encode())]
        log.error("output_refused_too_large", topic=output.topic, bytes=len(output.value), error=str(error),
                  action=f"dead-lettered as {reason} without its body")
        self.metrics.dlq_records.labels(reason).inc()
        self._produce(state, Output(tp, output.seq, self.settings.dlq_topic, output.key, b"", headers))
        return True

    # ==========================================================================================
    # committing
    # ==========================================================================================

    def _maybe_checkpoint(self) -> None:
        if self._pending_cut is None:
            if time.monotonic() - self._last_cut_at >= self.settings.commit_interval_s:
                self._pending_cut = self._take_cut()
        if self._pending_cut is not None and self._pending_cut.complete(self._ledgers()):
            self._commit(self._pending_cut)

    def _ledgers(self) -> dict[TP, OutputLedger]:
        return {tp: state.ledger for tp, state in self.parts.items()}

    def _take_cut(self) -> Cut | None:
        self._last_cut_at = time.monotonic()
        cut = Cut()
        for tp, state in self.parts.items():
            if state.position is None:
                continue
            oldest = state.windower.oldest_open_offset()
            commit_offset = oldest if oldest is not None else state.position
            fence = max(state.position, state.fence)
            if state.idle_held:  # replay must reach the cut's windows and publish them (see _close_idle_windows)
                commit_offset = min(commit_offset, state.idle_held[0].first_offset)
                fence = state.idle_cut_at if state.idle_cut_at is not None else fence
            if isinstance(state.windower, CountWindower):
                state.windower.forget_cuts_before(commit_offset)
            if state.last_committed == (commit_offset, fence) and not state.idle_held:
                continue
            part = PartitionCut(commit_offset, fence, state.ledger.issued, state.windower.snapshot())
            if part.needs_state_record:
                self._write_state(state, part)
            cut.partitions[tp] = part
        return cut if cut.partitions else None

    def _write_state(self, state: PartitionState, part: PartitionCut) -> None:
        """Large snapshots go to the state topic, split into records that fit; the commit points at them."""
        topic, partition = state.tp
        body = orjson.dumps({"v": 1, "topic": topic, "partition": partition, "commit_offset": part.commit_offset,
                             "fence": part.fence, "snapshot": part.snapshot})
        size = self.limits.state
        chunks = [body[start:start + size] for start in range(0, len(body), size)]
        part.state_refs = [None] * len(chunks)
        base = f"{self.settings.group_id}\x1f{topic}\x1f{partition}"
        for index, chunk in enumerate(chunks):
            seq = state.ledger.issue()
            part.required_seq = seq
            key = (base if index == 0 else f"{base}\x1f{index}").encode()  # compaction keeps each record's latest
            self._produce(state, Output(state.tp, seq, self.settings.resolved_state_topic, key, chunk, cut=part,
                                        chunk=index))

    def _commit(self, cut: Cut) -> bool:
        """Commit a complete cut; returns False when the broker did not take it (retried by a later cut)."""
        assert self.consumer is not None and self.producer is not None
        live = {tp: part for tp, part in cut.partitions.items() if tp in self.parts}
        offsets: list[TopicPartition] = []
        try:
            if self.exactly_once:
                self.producer.flush(KAFKA_CALL_TIMEOUT_S)  # state records get their offsets
                offsets = self._offsets(live)
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), KAFKA_CALL_TIMEOUT_S
                )
                self.producer.commit_transaction(KAFKA_CALL_TIMEOUT_S)
                self.producer.begin_transaction()
            else:
                offsets = self._offsets(live)
                if offsets:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            return self._on_commit_error(exc)
        self._pending_cut = None
        for tp, part in live.items():
            self.parts[tp].last_committed = (part.commit_offset, part.fence)
        self.metrics.commits.inc()
        self.metrics.last_commit_timestamp.set(time.time())
        self.health.broker_ok = True
        log.debug("committed", offsets={f"{tp.topic}/{tp.partition}": tp.offset for tp in offsets})
        if self.exactly_once:
            self._release_held()
        self._release_idle(live)
        return True

    @staticmethod
    def _offsets(parts: dict[TP, PartitionCut]) -> list[TopicPartition]:
        return [TopicPartition(t, p, part.commit_offset, metadata=part.metadata()) for (t, p), part in parts.items()]

    def _on_commit_error(self, exc: KafkaException) -> bool:
        error: KafkaError = exc.args[0]
        if error.fatal():
            raise FatalPipelineError(f"producer fenced or broken: {error}") from exc
        if self.exactly_once and error.txn_requires_abort():
            log.warning("transaction_aborted", error=str(error))
            self._abort_and_rewind(keep_out=set())
            return False
        log.warning("commit_failed", error=str(error), retriable=error.retriable())
        if not self.exactly_once:
            self._pending_cut = None  # a fresh cut at the next interval supersedes it
        return False

    def _release_held(self) -> None:
        for state in self.parts.values():
            held, state.held = state.held, []
            for output in held:
                self._produce(state, output)

    def _replace_producer(self) -> None:
        """Drop the transactional producer (its open transaction with it) and start a fresh one."""
        assert self.producer is not None
        self.producer.purge(in_queue=True, in_flight=True, blocking=False)
        self.producer.flush(0)
        self.producer = self._new_producer()
        self._pending_cut = None

    def _abort_and_rewind(self, keep_out: set[TP]) -> None:
        """Exactly-once recovery: abort the open transaction and replay every partition from its commit."""
        assert self.producer is not None
        try:
            self.producer.abort_transaction(KAFKA_CALL_TIMEOUT_S)
            self.producer.begin_transaction()
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise FatalPipelineError(f"cannot abort transaction: {exc}") from exc
            log.warning("transaction_abort_failed", error=str(exc), action="replacing the producer")
            self._replace_producer()
        self._pending_cut = None
        self._rewind({tp for tp in self.parts if tp not in keep_out})

    def _rewind(self, rewind: set[TP]) -> None:
        """Forget everything since the last commit of these partitions and read them again from it."""
        assert self.consumer is not None
        self.scorer.drop(lambda job: (job.window.topic, job.window.partition) not in rewind)
        if not rewind:
            return
        committed = self.consumer.committed([TopicPartition(*tp) for tp in rewind], timeout=KAFKA_CALL_TIMEOUT_S)
        for tp in committed:
            key = (tp.topic, tp.partition)
            old = self.parts.pop(key)
            position = parse_metadata(tp.offset, tp.metadata)
            self._adopt(key, position)
            start = position.offset if position.offset is not None else old.origin
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, start if start is not None else OFFSET_BEGINNING))
        log.warning("partitions_rewound", partitions=[f"{t}/{p}" for t, p in rewind])

    def _complete_now(self, deadline: float) -> None:
        """Publish everything closed so far and commit a cut that covers it, waiting until `deadline`."""
        if self._pending_cut is not None:
            self._wait_for_cut(deadline)
        if self._pending_cut is None:
            self._pending_cut = self._take_cut()
            if self._pending_cut is not None:
                self._wait_for_cut(deadline)
        if self._pending_cut is not None:
            log.warning("cut_not_committed", reason="deadline", in_flight=self.scorer.in_flight)
            if self.exactly_once:
                self._abort_and_rewind(keep_out=set())
            self._pending_cut = None

    def _wait_for_cut(self, deadline: float) -> None:
        assert self._pending_cut is not None and self.producer is not None
        while time.monotonic() < deadline:
            if self._fatal:
                raise FatalPipelineError(self._fatal)
            self._collect_results()
            self.producer.poll(0.02)
            if self._pending_cut.complete(self._ledgers()):
                if self._commit(self._pending_cut):
                    return
                if self._pending_cut is None:
                    return
                time.sleep(0.2)
            else:
                self.scorer.wait_idle(0.02)

    # ==========================================================================================
    # flow control and observation
    # ==========================================================================================

    def _in_flight(self) -> int:
        return self.scorer.in_flight + sum(len(state.held) for state in self.parts.values())

    def _apply_backpressure(self) -> None:
        in_flight = self._in_flight()
        self.metrics.queue_depth.set(in_flight)
        limit = self.settings.queue_max_windows
        if not self._paused and in_flight >= limit:
            self._pause_all()
            log.info("backpressure_pause", in_flight=in_flight, limit=limit)
        elif self._paused and in_flight <= limit // 2 and not self.stop_event.is_set():
            self._resume_all()
            log.info("backpressure_resume", in_flight=in_flight)

    def _pause_all(self) -> None:
        assert self.consumer is not None
        self._paused = True
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)
        self.metrics.paused_partitions.set(len(assignment))

    def _resume_all(self) -> None:
        assert self.consumer is not None
        self._paused = False
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.resume(assignment)
        self.metrics.paused_partitions.set(0)

    def _once_done(self) -> bool:
        if not self._assigned_once or self._assignment.waiting(once=True):
            return False
        return all(state.caught_up for state in self.parts.values())

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.scoring_seconds.observe(seconds)
        stats = getattr(self.detector, "cache_stats", None)
        if callable(stats):
            self.metrics.observe_cache_stats(stats())

    def _observe_coverage(self, share: float, trained: float, alarm: float) -> None:
        self.metrics.unseen_template_share.set(share)
        self.metrics.unseen_template_trained_share.set(trained)
        self.metrics.unseen_template_alarm_share.set(alarm)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_at < 5.0 or self.consumer is None:
            return
        self._last_lag_at = now
        if not self.health.broker_ok:
            self._probe_broker()
        # Paused partitions are not fetched, so their cached high watermark goes stale exactly when the
        # lag matters (backpressure): ask the broker then.
        cached = not self._paused
        for (topic, partition), state in self.parts.items():
            if state.position is None:
                continue
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=1.0,
                                                              cached=cached)
            except KafkaException:
                if cached:
                    continue
                break  # the broker does not answer: do not stall the poll loop on every partition
            if high >= 0:
                self.metrics.consumer_lag.labels(topic, str(partition)).set(max(0, high - state.position))

    def _observe_health(self) -> None:
        """Say why no partition comes (every assignment timeout); judge dead-letter shares (every 5 s)."""
        assert self.consumer is not None
        why = check_assignment(self._assignment, self.settings, self.consumer, self.settings.once)
        if why is not None:
            self.health.waiting_for = why
        now = time.monotonic()
        if now - self._last_health_at >= 5.0:
            self._last_health_at = now
            self._dead_letters.evaluate()

    def _probe_broker(self) -> None:
        """After a transport error, /readyz stays 503 until a metadata request proves the broker answers."""
        assert self.consumer is not None
        try:
            self.consumer.list_topics(self.settings.input_topic[0], timeout=1.0)
        except KafkaException:
            return
        self.health.broker_ok = True

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.health.broker_ok = False
        if error.fatal() or error.code() == KafkaError._FATAL:
            self._fatal = f"kafka client fatal error: {error}"
        suppressed = self._error_log.allow(error.name(), time.monotonic())
        if suppressed is not None:
            log.warning("kafka_error", error=str(error), code=error.name(), suppressed_since_last=suppressed)
