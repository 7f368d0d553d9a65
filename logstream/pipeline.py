"""The consumer: raw topic -> parse -> window -> score -> publish -> commit, wired together.

Threads: the poll loop (this module) owns the Kafka consumer and producer and all per-partition
state; the scoring thread (`scoring.ScoringWorker`) owns the detector. The poll loop never blocks on
the detector: it submits closed windows, collects verdicts each iteration, and pauses its partitions
while too many windows are in flight (backpressure), so it keeps polling within max.poll.interval.

Where each part lives: per-partition state (`partitions.PartitionState`: windowing engine, next
offset to read, replay fence, ledger of outputs not yet acknowledged), records into windows
(`ingest`), alerts and dead letters (`publishing`), and the commit policy (`checkpoint.CommitPolicy`):
offsets are committed by cuts, never past the oldest open window, never before the outputs of the
lines below the cut are acknowledged (at-least-once) or committed in the same transaction (exactly-once).

Lifecycle:
  - assign: read the committed offset and its metadata; check it against the log and the window
    settings (`resume`: a recreated topic starts from its earliest offset, changed settings replay
    with no fence and no snapshot); rebuild open sessions from the replay;
  - revoke: score and publish what is closed, commit a final cut (bounded wait), drop the state;
    the next owner replays the open windows from the committed offset;
  - lost: drop the state, commit nothing (exactly-once: abort the open transaction);
  - SIGTERM: stop reading, finish in-flight scoring within the shutdown timeout, publish, commit, leave;
  - `--once`: read to the end offsets as of assignment, close every window, publish, commit, exit 0.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import repeat
from operator import attrgetter

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from logstream.assignment import AssignmentWatch, check_assignment
from logstream.checkpoint import (
    CommitPolicy,
    CommittedPosition,
    Cut,
    OutputLedger,
    PartitionCut,
    close_clients,
    parse_metadata,
    read_snapshot,
)
from logstream.coverage import CoverageMonitor
from logstream.deadletters import DeadLetterWatch
from logstream.detectors.base import Detector
from logstream.errors import FatalFlag, FatalPipelineError, KafkaSetupError, first_cause
from logstream.fingerprint import window_fingerprint
from logstream.ingest import Ingest
from logstream.intake import ConsumeSizer
from logstream.kafka import (
    KAFKA_CALL_TIMEOUT_S,
    assign_at,
    base_config,
    consumer_config,
    fatal_reason,
    is_fatal,
    kafka_client,
    producer_config,
    require_topics,
    stop_reason,
    wait_for_broker,
)
from logstream.lag import LagMonitor
from logstream.logs import LogThrottle, get_logger
from logstream.metrics import Health, Metrics
from logstream.outputs import STATE_CHUNK_BYTES, OutputLimits, ensure_output_topics, output_limits
from logstream.parsing import LineParser
from logstream.partitions import TP, PartitionState
from logstream.publishing import Publisher
from logstream.records import Window
from logstream.resume import Resume, resume_position, warn
from logstream.scoring import ScoreJob, ScoringWorker
from logstream.settings import Settings
from logstream.windows import make_windower, window_options

__all__ = ["FatalPipelineError", "Pipeline"]

log = get_logger(__name__)

CONSUME_BATCH = 2000  # records per consume call at most (`intake.ConsumeSizer` picks fewer when windows wait)
REBALANCE_DRAIN_S = 10.0
# How long the poll loop lets the scorer work through a burst before pausing its partitions. One
# consume batch can close hundreds of sessions at once (stream time jumps past many deadlines); a
# scorer that catches up within this costs no pause, while a pause empties the consumer's fetch queue
# and its resume waits for a new fetch (~0.5 s on the embedded broker).
PAUSE_GRACE_S = 0.2
# The poll loop makes an object per line and keeps it until its window closes; with the collector's
# default young-generation threshold (700 allocations) it would rescan them every few hundred lines.
# `run` raises the threshold for its duration (the line objects hold no reference cycles).
GC_YOUNG_THRESHOLD = 50_000
_KIND_AND_REASON = attrgetter("kind", "close_reason")  # a closed window's labels in `windows_closed`


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
        self.window_settings = window_fingerprint(settings)  # recorded in every commit (`resume`)
        self.exactly_once = settings.guarantee == "exactly-once"
        self.parts: dict[TP, PartitionState] = {}
        self._epoch = 0
        self._assigned_once = False
        self._paused = False
        self._sizer = ConsumeSizer(CONSUME_BATCH)
        self._windows_submitted = 0  # windows handed to the scorer so far (the sizer's rate)
        self._fatal = FatalFlag()
        self.failure: str | None = None  # why the run stopped with exit code 2 (one line for the operator)
        self._committing = True  # False once the run failed or stops uncleanly: nothing more is committed
        self._error_log = LogThrottle(10.0)
        self._assignment = AssignmentWatch(settings.input_topic, settings.effective_assignment_timeout_s)
        self._dead_letters = DeadLetterWatch(self.metrics, settings.format, settings.window)
        self._last_health_at = 0.0
        self._lag = LagMonitor(self.metrics, self.health, settings.input_topic[0])
        self.consumer: Consumer | None = None
        self.policy = CommitPolicy(settings, self, {**producer_config(settings), "error_cb": self._on_kafka_error},
                                   self.stop_event)
        self.publisher = Publisher(
            settings, detector, self.parts, self.policy, self.metrics, self.health, self._dead_letters, self._fatal,
            OutputLimits(settings.alert_max_bytes, settings.dlq_max_bytes, STATE_CHUNK_BYTES),
        )
        self.ingest = Ingest(settings, self.parser, self.metrics, self.publisher, self._dead_letters, self._fatal,
                             self._error_log, self._submit)
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
        """Run until stopped (or, with `once`, until the input is consumed). Returns the exit code.

        0: stopped or done; 2: a fatal Kafka condition (a fenced instance), said in `failure` (one line,
        also logged as `pipeline_fatal`), met while running or while closing. `KafkaSetupError` before
        anything started (broker unreachable, a missing `--once` input, a topic or client configuration
        Kafka refuses).
        """
        try:
            self._prepare()
        except KafkaSetupError:
            self.detector.close()
            raise
        self.scorer.start()
        code = 1  # an exception out of the loop is not a clean stop
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], GC_YOUNG_THRESHOLD), *thresholds[1:])
        try:
            self._start()
            code = self._loop()
        except (FatalPipelineError, KafkaException, SystemError) as exc:  # `kafka.stop_reason`
            if (reason := stop_reason(exc, self.policy.fatal_reason)) is None:
                raise
            code = self._fail(reason)
        finally:
            gc.set_threshold(*thresholds)
            problem = self._close(clean=code == 0)
        if problem is not None:
            code = self._fail(problem)
        return code

    def _prepare(self) -> None:
        """Kafka answers, a batch run's input exists, the output topics exist and the consumer is built;
        `KafkaSetupError` otherwise."""
        settings = self.settings
        metadata = wait_for_broker(base_config(settings), settings.connect_timeout_s)
        if settings.once:
            require_topics(metadata, list(settings.input_topic), settings.bootstrap_servers)
        for topic in settings.input_topic:
            if topic not in metadata.topics:
                log.warning("input_topic_missing", topic=topic, action="waiting: it is consumed within seconds of "
                            "being created")
        if settings.create_topics:
            ensure_output_topics(settings)
        self.publisher.limits = output_limits(settings)
        self.consumer = kafka_client(Consumer, {**consumer_config(settings), "error_cb": self._on_kafka_error})

    def _start(self) -> None:
        """Start the producer (exactly-once: fence earlier instances; `FatalPipelineError` when that fails for
        good) and join the group."""
        assert self.consumer is not None
        settings = self.settings
        self.policy.start(self.consumer)
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

    def _fail(self, reason: str) -> int:
        """Record the fatal condition that explains the stop (`failure`, `errors.first_cause`; logged as
        `pipeline_fatal`) and return its exit code, 2."""
        reason = first_cause(self.failure, reason)
        if reason != self.failure:
            self.failure = reason
            log.error("pipeline_fatal", error=reason)
        self._committing = False
        return 2

    def _loop(self) -> int:
        assert self.consumer is not None
        while True:
            self._fatal.raise_if_set()
            if self.stop_event.is_set():
                self._shutdown(deadline=time.monotonic() + self.settings.shutdown_timeout_s)
                return 0
            # Never read many more records than close the windows there is room for: keeps the in-flight bound.
            room = self.settings.queue_max_windows - self._in_flight()
            wanted = self._sizer.records(room, self._once_remaining() if self.settings.once else None)
            messages = self.consumer.consume(wanted, 0.1)
            self.health.last_poll = time.time()
            if messages:
                submitted = self._windows_submitted
                self.ingest.handle(messages, self.parts)
                self._sizer.observe(len(messages), self._windows_submitted - submitted)
            self._collect_results()
            self._apply_backpressure()
            self._close_idle_windows()
            self.policy.tick()
            self._lag.update(self.consumer, self.parts, self._paused)
            self._observe_health()
            if self.settings.once and self._once_done():
                self._finish_input()
                return 0

    def _shutdown(self, deadline: float) -> None:
        """SIGTERM: stop reading, finish what is in flight, publish, commit. Open windows are replayed later."""
        log.info("shutdown_started", in_flight=self.scorer.in_flight)
        self._pause_all()
        self.scorer.flush_partial(True)
        self.policy.complete_now(deadline)
        self._dead_letters.evaluate(final=True)

    def _finish_input(self) -> None:
        """`--once`: close every window, score and publish them all, commit the end offsets."""
        for state in self.parts.values():
            self._submit(state, state.windower.flush())
            state.open_gauge.set(0)
        self.scorer.flush_partial(True)
        self.policy.complete_now(deadline=math.inf)
        self._dead_letters.evaluate(final=True)
        log.info("input_finished", partitions=len(self.parts))

    def _close(self, clean: bool) -> str | None:
        """Stop scoring, flush (or abort) the producer, leave the group, close the detector.

        Never raises a Kafka error: a fatal one met here (the producer fenced while it flushed, a
        revoke's commit refused) is returned as the reason to stop with. After an unclean stop the
        partitions the group takes back on close are dropped without a commit.
        """
        self._committing = self._committing and clean
        self.scorer.stop()
        problem = close_clients(self.policy, self.consumer, clean)
        self.detector.close()
        log.info("run_summary", **self.metrics.summary())
        log.info("pipeline_stopped", clean=clean and problem is None)
        return problem

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
        seeks: dict[TP, int] = {}
        for tp in committed:
            key = (tp.topic, tp.partition)
            bounds = self._watermarks(key)
            resume = self._resume(key, parse_metadata(tp.offset, tp.metadata), bounds)
            self._adopt(key, resume.position, bounds)
            if resume.seek is not None:
                seeks[key] = resume.seek
        if seeks:  # the consumer would fetch the committed offset: assign these at the offsets chosen instead
            assign_at(consumer, partitions, seeks)
        if self._paused:
            consumer.pause(partitions)
        self.metrics.assigned_partitions.set(len(self.parts))
        self.health.assigned = True
        log.info(
            "partitions_assigned",
            partitions=[f"{tp.topic}/{tp.partition}@{tp.offset}" for tp in committed],
            owned=len(self.parts),
        )

    def _watermarks(self, tp: TP) -> tuple[int, int] | None:
        """The partition's (low, high) offsets now. `--once` needs them (its end): an error propagates;
        a streaming consumer goes on without them (None: the committed offset is not checked against
        the log, the running check of `ingest` still sees an offset reset)."""
        assert self.consumer is not None
        try:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=KAFKA_CALL_TIMEOUT_S)
        except KafkaException as exc:
            if self.settings.once:
                raise
            log.warning("watermarks_unknown", partition=f"{tp[0]}/{tp[1]}", error=str(exc))
            return None
        return low, high

    def _resume(self, tp: TP, committed: CommittedPosition, bounds: tuple[int, int] | None) -> Resume:
        """Where a partition we now own starts (`resume.resume_position`), warning when the commit's
        fence and snapshot are dropped."""
        resume = resume_position(committed, self.window_settings, bounds)
        warn(tp, committed, resume, self.window_settings, bounds)
        return resume

    def _adopt(self, tp: TP, committed: CommittedPosition, bounds: tuple[int, int] | None) -> PartitionState:
        """Create the state of a partition we now own from `committed` (as `_resume` decided it), rebuilding
        open sessions where needed. `bounds`: the partition's (low, high) offsets, required with `--once`."""
        assert self.consumer is not None
        self._epoch += 1
        windower = make_windower(self.settings.window, tp[0], tp[1], **window_options(self.settings))
        state = PartitionState(tp, windower, self._epoch, committed, self.metrics, self.window_settings)
        self.parser.forget(*tp)  # inherited line times start afresh, as in a fresh consumer: replays agree
        snapshot = committed.snapshot
        if committed.state_refs:
            snapshot = read_snapshot(self.settings, tp, committed)
        if snapshot is not None and committed.offset is not None:
            windower.restore(snapshot, committed.fence)
        if self.settings.once:
            assert bounds is not None
            low, high = bounds
            state.end_at_start = high
            if high <= max(low, committed.offset or 0):
                state.eof = True
        self.parts[tp] = state
        return state

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions} & set(self.parts)
        if not revoked:
            return
        if not self._committing:  # closing after a failure: the next owner replays from the last commit
            self._drop(revoked)
            return
        self.metrics.rebalances.labels("revoke").inc()
        log.info("partitions_revoked", partitions=sorted(f"{t}/{p}" for t, p in revoked))
        self.scorer.flush_partial(True)
        self.policy.complete_now(time.monotonic() + min(REBALANCE_DRAIN_S, self.settings.shutdown_timeout_s))
        self.scorer.flush_partial(False)
        self._drop(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(tp.topic, tp.partition) for tp in partitions} & set(self.parts)
        self.metrics.rebalances.labels("lost").inc()
        log.warning("partitions_lost", partitions=sorted(f"{t}/{p}" for t, p in lost))
        if self._committing:
            # A fenced instance must not start a fresh transactional producer (`policy.on_lost`): it
            # would fence the instance that took over in turn.
            self._fatal.raise_if_set()
            self.policy.on_lost(lost)
        self._drop(lost)

    def _drop(self, tps: set[TP]) -> None:
        for tp in tps:
            state = self.parts.pop(tp, None)
            if state is not None:
                state.open_gauge.set(0)
            self.metrics.forget_partition(*tp)
            self._dead_letters.forget(tp)
        self.scorer.drop(lambda job: (job.window.topic, job.window.partition) not in tps)
        self.policy.forget(tps)
        self.metrics.assigned_partitions.set(len(self.parts))
        self.health.assigned = bool(self.parts)

    # ==========================================================================================
    # the commit policy's host (checkpoint.CommitHost)
    # ==========================================================================================

    def take_cut(self) -> Cut | None:
        cut = Cut()
        for tp, state in self.parts.items():
            part = state.cut()
            if part is None:
                continue
            if part.needs_state_record:
                self.publisher.write_state(state, part)
            cut.partitions[tp] = part
        return cut if cut.partitions else None

    def ledgers(self) -> Mapping[TP, OutputLedger]:
        return {tp: state.ledger for tp, state in self.parts.items()}

    def pump(self) -> None:
        self._fatal.raise_if_set()
        self._collect_results()

    def wait(self, seconds: float) -> None:
        self.scorer.wait_idle(seconds)

    def committed(self, parts: Mapping[TP, PartitionCut]) -> None:
        for tp, part in parts.items():
            self.parts[tp].last_committed = (part.commit_offset, part.fence)
        self.metrics.commits.inc()
        self.metrics.last_commit_timestamp.set(time.time())
        self.health.broker_ok = True
        if self.exactly_once:
            self.publisher.release_held()
        self._release_idle(parts)

    def rewound(self, tp: TP, position: CommittedPosition) -> int | None:
        """Exactly-once rewind to the last commit, checked as an assignment's is (`_resume`; against the log
        with `--once` only): a commit made before this ownership's first one may be of other settings or
        of a log recreated since."""
        self.scorer.drop(lambda job: (job.window.topic, job.window.partition) != tp)
        old = self.parts.pop(tp)
        # Only `--once` asks for the end offsets here (it needs them): a streaming rewind (a broker outage,
        # perhaps) makes no new broker call, and a log recreated since is still seen when the client
        # resets its offset (`ingest`, offset_reset)
        bounds = self._watermarks(tp) if self.settings.once else None
        resume = self._resume(tp, position, bounds)
        self._adopt(tp, resume.position, bounds)
        start = resume.position.offset
        return start if start is not None else old.origin

    # ==========================================================================================
    # windows
    # ==========================================================================================

    def _close_idle_windows(self) -> None:
        """The open windows of a partition quiet for --window-idle-s (count windows) or --session-idle-s
        (session windows; off by default) close (reason idle) after their last line.

        The cut goes into the next commit's metadata before its windows are published (they are held
        until then), with the position at the cut as its fence (`PartitionState.idle_cut`):
        a replay from that commit cuts at the same line and publishes them though below the fence
        (`AddResult.cut`), so a restart sees the same windows with the same ids and repeats no other
        output of the records read before the cut (dead letters after the cut's line).
        """
        idle_s = self.settings.session_idle_s if self.settings.window == "session" else self.settings.window_idle_s
        if not idle_s or self.settings.once or self.policy.pending is not None:
            return
        now = time.monotonic()
        cut = False
        for state in self.parts.values():
            cut = state.idle_cut(now, idle_s) or cut
        if cut:
            self.policy.cut_now()

    def _release_idle(self, tps: Iterable[TP]) -> None:
        """A committed cut recorded the idle cuts: their windows may be judged and published now."""
        for tp in tps:
            state = self.parts.get(tp)
            if state is not None and state.idle_held:
                self._submit(state, state.release_idle())

    def _submit(self, state: PartitionState, windows: list[Window]) -> None:
        """Hand closed windows to the scorer, each with its output sequence number; `windows_closed` is
        raised once per (kind, reason) among them, not window by window (the metric ends the same)."""
        self._windows_submitted += len(windows)
        labels = list(map(_KIND_AND_REASON, windows))
        if labels:  # most calls: every window closed for one reason (a C-level count, not a Counter)
            counts = {labels[0]: len(labels)} if labels.count(labels[0]) == len(labels) else Counter(labels)
            for (kind, reason), n in counts.items():
                self.metrics.windows_closed.labels(kind, reason).inc(n)
        jobs = list(map(ScoreJob, windows, repeat(state.epoch), state.ledger.issue_many(len(windows))))
        self.scorer.submit_many(jobs)  # one lock, at most one wake-up of the scorer

    def _collect_results(self) -> None:
        self.publisher.publish_results(self.scorer.take_results())
        if self.policy.producer is not None:
            self.policy.producer.poll(0)

    # ==========================================================================================
    # flow control and observation
    # ==========================================================================================

    def _in_flight(self) -> int:
        return self.scorer.in_flight + sum(len(state.held) for state in self.parts.values())

    def _apply_backpressure(self) -> None:
        in_flight = self._in_flight()
        self.metrics.queue_depth.set(in_flight)
        limit = self.settings.queue_max_windows
        if not self._paused and in_flight >= limit and self.scorer.wait_below(limit, PAUSE_GRACE_S):
            self._collect_results()  # the scorer worked through the burst: no pause
            in_flight = self._in_flight()
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

    def _once_remaining(self) -> int | None:
        """`--once`: records left before the end offsets of the partitions not at their end (None while a
        partition's position or end is unknown). Reading them is enough (`PartitionState.caught_up`): no
        wait for the end-of-partition event, which takes one more fetch. Control records of transactions
        take offsets but are not delivered: then the last consume call waits for its timeout, as without this."""
        left = 0
        for state in self.parts.values():
            if state.eof:
                continue
            if state.end_at_start is None or state.position is None:
                return None
            left += max(0, state.end_at_start - state.position)
        return left if self.parts else None

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

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.health.broker_ok = False
        if is_fatal(error):
            self._fatal.set(fatal_reason(error, self.settings))
        suppressed = self._error_log.allow(error.name(), time.monotonic())
        if suppressed is not None:
            log.warning("kafka_error", error=str(error), code=error.name(), suppressed_since_last=suppressed)
