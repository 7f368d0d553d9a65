"""Output publishing: verdicts become alerts, bad records and failures become dead letters, every
record is tracked in its input partition's ledger until it is done (see `checkpoint`).

At-least-once: an output is done when the broker acknowledges it. Exactly-once: when it is produced
into the open transaction; outputs issued after a pending cut are held until that cut commits.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from confluent_kafka import KafkaError, Message

from logstream import __version__
from logstream.alerts import OutputTooLarge, build_alert, encode_alert, now_iso, severity
from logstream.checkpoint import CommitPolicy, PartitionCut
from logstream.deadletters import DeadLetterWatch
from logstream.detectors.base import Detector
from logstream.errors import FatalFlag
from logstream.kafka import fatal_reason, is_fatal
from logstream.logs import get_logger
from logstream.metrics import Health, Metrics
from logstream.outputs import MAX_ERROR_CHARS, MAX_KEY_BYTES, OutputLimits
from logstream.records import Window
from logstream.scoring import ScoreResult
from logstream.settings import Settings

if TYPE_CHECKING:
    from logstream.partitions import PartitionState

log = get_logger(__name__)

TP = tuple[str, int]


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


def source_headers(topic: str, partition: int, offset: int, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """The headers of a dead-letter record: why, and which input record it stands for."""
    return [
        ("logstream.reason", reason.encode()),
        ("logstream.detail", detail[:1000].encode()),
        ("logstream.source.topic", topic.encode()),
        ("logstream.source.partition", str(partition).encode()),
        ("logstream.source.offset", str(offset).encode()),
        ("logstream.version", __version__.encode()),
    ]


class Publisher:
    """Builds and produces the outputs of the owned partitions (poll thread; delivery callbacks too)."""

    def __init__(self, settings: Settings, detector: Detector, parts: Mapping[TP, PartitionState],
                 policy: CommitPolicy, metrics: Metrics, health: Health, dead_letters: DeadLetterWatch,
                 fatal: FatalFlag, limits: OutputLimits) -> None:
        self.settings = settings
        self.detector = detector
        self.parts = parts
        self.policy = policy
        self.metrics = metrics
        self.health = health
        self.dead_letters = dead_letters
        self.fatal = fatal
        self.limits = limits  # lowered at start to what the output topics take (outputs.output_limits)
        self.exactly_once = policy.exactly_once

    # --- what to publish ------------------------------------------------------------------------

    def publish_results(self, results: Sequence[ScoreResult]) -> None:
        """Scored windows, in order: for each an alert (or nothing for a normal one, by --emit) or a
        detector_error dead letter. What a batch shares is done once: its alerts carry one creation
        time, and the verdict counters are raised once per label."""
        if not results:
            return
        created_at = now_iso()
        verdicts = {"anomalous": 0, "normal": 0}
        quiet, parts = self.settings.emit == "anomalous", self.parts
        for result in results:
            job = result.job
            state = parts.get((job.window.topic, job.window.partition))
            if state is None or state.epoch != job.epoch:
                continue  # the partition moved (or was rewound) since: the next owner replays this window
            verdict = result.verdict
            if quiet and verdict is not None and not verdict.anomalous:  # most windows: judged normal, no output
                verdicts["normal"] += 1
                state.ledger.complete(job.seq)
                continue
            self._publish(result, state, created_at, verdicts)
        for label, n in verdicts.items():
            if n:
                self.metrics.verdicts.labels(label).inc(n)

    def _publish(self, result: ScoreResult, state: PartitionState, created_at: str, verdicts: dict[str, int]) -> None:
        """One scored window with an output, of a partition still owned in the window's epoch (`state`; see
        `publish_results`, which completes a normal verdict that --emit anomalous does not publish): an
        alert, or a dead letter; its verdict is counted in `verdicts`."""
        job = result.job
        window = job.window
        if result.verdict is None:
            self.metrics.scoring_errors.inc()
            body = {
                "window_id": window.window_id, "key": window.key[:MAX_KEY_BYTES], "first_offset": window.first_offset,
                "last_offset": window.last_offset, "error": (result.error or "")[:MAX_ERROR_CHARS],
            }
            self.emit(Output(state.tp, job.seq, self.settings.dlq_topic, window.key.encode(), orjson.dumps(body),
                             source_headers(window.topic, window.partition, window.first_offset, "detector_error",
                                            result.error or "")))
            self.metrics.dlq_records.labels("detector_error").inc()
            return
        verdicts["anomalous" if result.verdict.anomalous else "normal"] += 1
        alert = build_alert(window, result.verdict, self.detector.name, self.detector.version, created_at)
        try:
            value, truncated = encode_alert(alert, self.limits.alert)
        except OutputTooLarge as exc:
            self._output_too_large(state, job.seq, window, str(exc))
            return
        if truncated:
            self.metrics.outputs_truncated.labels("alert").inc()
            log.info("alert_truncated", alert_id=alert["alert_id"], parts=truncated, bytes=len(value),
                     limit=self.limits.alert)
        self.emit(Output(state.tp, job.seq, self.settings.alerts_topic, window.key.encode()[:MAX_KEY_BYTES], value,
                         severity=severity(result.verdict)))

    def _output_too_large(self, state: PartitionState, seq: int, window: Window, error: str) -> None:
        """An alert that cannot fit even at its minimum: a small dead-letter record names the window instead."""
        body = {"window_id": window.window_id, "first_offset": window.first_offset,
                "last_offset": window.last_offset, "error": error[:MAX_ERROR_CHARS]}
        self.metrics.dlq_records.labels("output_too_large").inc()
        self.emit(Output(state.tp, seq, self.settings.dlq_topic, window.key.encode()[:MAX_KEY_BYTES],
                         orjson.dumps(body), source_headers(window.topic, window.partition, window.first_offset,
                                                            "output_too_large", error)))

    def dead_letter(self, state: PartitionState, message: Message, reason: str, detail: str) -> None:
        """The input record itself goes to the dead-letter topic (its head, when larger than the topic takes)."""
        self.metrics.dlq_records.labels(reason).inc()
        self.dead_letters.dead(state.tp, reason, detail, message.offset())
        headers = source_headers(message.topic(), message.partition(), message.offset(), reason, detail)
        value = message.value() or b""
        if len(value) > self.limits.dlq:  # the broker would refuse it: keep the head, say so
            headers.append(("logstream.original-size", str(len(value)).encode()))
            value = value[: self.limits.dlq]
            self.metrics.outputs_truncated.labels("dead_letter").inc()
        key = message.key()
        if key is not None and len(key) > MAX_KEY_BYTES:
            headers.append(("logstream.original-key-size", str(len(key)).encode()))
            key = key[:MAX_KEY_BYTES]
        self.emit(Output(state.tp, state.ledger.issue(), self.settings.dlq_topic, key, value, headers))

    def write_state(self, state: PartitionState, part: PartitionCut) -> None:
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
            self.produce(state, Output(state.tp, seq, self.settings.resolved_state_topic, key, chunk, cut=part,
                                       chunk=index))

    # --- producing ------------------------------------------------------------------------------

    def emit(self, output: Output) -> None:
        """Publish now, or hold it (exactly-once) while a pending cut's transaction must not include it."""
        state = self.parts[output.tp]
        if self.policy.holds(output.tp, output.seq):
            state.held.append(output)
            return
        self.produce(state, output)

    def release_held(self) -> None:
        """Exactly-once, after a commit: the outputs held back go into the new transaction."""
        for state in self.parts.values():
            held, state.held = state.held, []
            for output in held:
                self.produce(state, output)

    def produce(self, state: PartitionState, output: Output) -> None:
        producer = self.policy.producer
        assert producer is not None
        callback = functools.partial(self._delivered, state.tp, state.epoch, output)
        while True:
            try:
                producer.produce(output.topic, output.value, output.key, headers=output.headers, on_delivery=callback)
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: let deliveries drain
        if self.exactly_once and output.cut is None:
            state.ledger.complete(output.seq)  # part of the open transaction: done when it commits
        if output.severity is not None:
            self.metrics.alerts_published.labels(output.severity).inc()

    def _delivered(self, tp: TP, epoch: int, output: Output, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            if self.exactly_once and self.fatal.reason is None and error.code() == KafkaError._PURGE_QUEUE:
                return  # an aborted transaction's records: the rewind re-produces them
            if self._refused_as_too_large(tp, epoch, output, error):
                return
            if is_fatal(error):
                self.fatal.set(fatal_reason(error, self.settings))
            else:
                self.fatal.set(f"delivery to {output.topic} failed: {error}")
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
        self.produce(state, Output(tp, output.seq, self.settings.dlq_topic, output.key, b"", headers))
        return True
