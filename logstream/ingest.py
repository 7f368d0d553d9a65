"""Input records -> lines -> windows, for the partitions the poll loop owns.

A record is parsed into a line (or dead-lettered as a bad record), joined to its partition's
windows, and the windows it closed are handed on for scoring. Lines below a partition's replay
fence are replayed: they rebuild windows but repeat no side effect (dead letters, alerts, metrics
of new work) already done by an earlier owner.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import cast

from confluent_kafka import KafkaError, Message

from logstream.deadletters import DeadLetterWatch
from logstream.errors import FatalFlag
from logstream.logs import LogThrottle, get_logger
from logstream.metrics import Metrics
from logstream.parsing import BadRecord, LineParser
from logstream.partitions import TP, PartitionState
from logstream.publishing import Publisher
from logstream.records import LogLine, Window
from logstream.routing import BLOCKS_HEADER, COPY_HEADER
from logstream.settings import Settings
from logstream.windows import CountWindower

log = get_logger(__name__)


class Ingest:
    """Feeds consumed records into the windows of their partitions (poll thread only)."""

    def __init__(self, settings: Settings, parser: LineParser, metrics: Metrics, publisher: Publisher,
                 dead_letters: DeadLetterWatch, fatal: FatalFlag, error_log: LogThrottle,
                 submit: Callable[[PartitionState, list[Window]], None]) -> None:
        self.settings = settings
        self.parser = parser
        self.metrics = metrics
        self.publisher = publisher
        self.dead_letters = dead_letters
        self.fatal = fatal
        self.error_log = error_log
        self.submit = submit
        self.session_windows = settings.window == "session"

    def handle(self, messages: list[Message], parts: Mapping[TP, PartitionState]) -> None:
        """One consumed batch: records of partitions not owned (fetched just before a revoke) are skipped.

        Each partition's records are taken together, in offset order: parsed in one pass
        (`LineParser.parse_batch`), fed to its windows (count windows in one call, sessions line by
        line), and the windows they closed handed on a scoring batch at a time. The result is what
        handling the records one at a time gives."""
        batches: dict[TP, list[Message]] = {}
        eof_after: dict[TP, int] = {}  # partition -> its records in this batch before its end-of-partition event
        for message in messages:
            error = message.error()
            tp = (message.topic(), message.partition())
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    eof_after[tp] = len(batches.get(tp, ()))
                else:
                    self._on_consume_error(message, error)
                continue
            if tp not in parts:
                continue  # a message fetched just before its partition was revoked
            batch = batches.get(tp)
            if batch is None:
                batches[tp] = batch = []
            batch.append(message)
        for tp, batch in batches.items():
            state = parts[tp]
            self._handle_records(state, batch)
            n = len(batch)
            self.dead_letters.read(tp, n)
            state.lines_counter.inc(n)
            state.open_gauge.set(state.windower.open_windows)
        for tp, before in eof_after.items():
            state = parts.get(tp)
            if state is not None and before == len(batches.get(tp, ())):
                state.eof = True  # no record of the partition came after its end

    def _on_consume_error(self, message: Message, error: KafkaError) -> None:
        """A consume error other than end-of-partition (which `handle` notes on the partition)."""
        if error.fatal() or error.code() == KafkaError._FATAL:
            self.fatal.set(f"consumer fenced or broken: {error}")  # e.g. a newer instance took our static id
            return
        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            topic = message.topic()
            if self.settings.once:  # checked at start: it was deleted while this batch run read it
                self.fatal.set(f"input topic {topic!r} disappeared from {self.settings.bootstrap_servers}")
                return
            if self.error_log.allow(f"missing:{topic}", time.monotonic()) is not None:
                log.warning("input_topic_missing", topic=topic, action="waiting: it is consumed within seconds of "
                            "being created")
            return
        suppressed = self.error_log.allow(f"consume:{error.name()}", time.monotonic())
        if suppressed is not None:
            log.warning("consume_error", error=str(error), suppressed_since_last=suppressed)

    def _handle_records(self, state: PartitionState, batch: list[Message]) -> None:
        """Consecutive records of one partition: position and replay counts, one parse, then the windows."""
        topic, partition = state.tp
        first, last = batch[0].offset(), batch[-1].offset()
        state.position = last + 1
        state.eof = False
        if state.origin is None:
            state.origin = first
        fence = state.fence
        if first < fence:
            state.replay_counter.inc(sum(1 for m in batch if m.offset() < fence))
        # A multi-block line counts once, in its primary copy (see routing.route): with count windows a
        # copy is skipped before parsing, as it never reached the parser.
        copies = [_is_copy(m) for m in batch]
        todo = [(m, c) for m, c in zip(batch, copies) if not (c and not self.session_windows)]
        if not todo:
            return
        times = [m.timestamp()[1] / 1000.0 for m, _ in todo]
        parsed = self.parser.parse_batch([m.value() for m, _ in todo], topic=topic, partition=partition,
                                         offsets=[m.offset() for m, _ in todo], record_times=times)
        closed: list[Window] = []
        if not self.session_windows:  # count windows (settings.window): the engine is a CountWindower
            self._count_lines(state, cast(CountWindower, state.windower), todo, parsed, closed)
        else:
            enough = self.settings.batch_size  # a scoring batch's worth is handed on at once: the scorer starts on it
            for (message, copy), line, record_time in zip(todo, parsed, times):
                self._handle_line(state, message, line, record_time, copy, message.offset() < fence, closed)
                if len(closed) >= enough:
                    self.submit(state, closed)
                    closed = []
        if closed:
            self.submit(state, closed)

    def _count_lines(self, state: PartitionState, windower: CountWindower, todo: list[tuple[Message, bool]],
                     parsed: list[LogLine | BadRecord], closed: list[Window]) -> None:
        """Count windows take the batch's good lines in one call (no line is ever late, unkeyed or
        from the future there): what `_handle_line` does line by line, with the same side effects."""
        fence = state.fence
        good: list[LogLine] = []
        for (message, _copy), line in zip(todo, parsed):  # copies never reach count windows
            if isinstance(line, BadRecord):
                self.metrics.parse_errors.labels(line.reason).inc()
                if message.offset() >= fence:
                    self.publisher.dead_letter(state, message, line.reason, line.detail)
            else:
                good.append(line)
        if not good:
            return
        batch = windower.add_batch(good)
        state.last_line_at = time.monotonic()
        opened = sum(1 for offset in batch.opened_at if offset >= fence)
        if opened:
            self.metrics.windows_opened.labels(self.settings.window).inc(opened)
        suppressed: dict[int, int] = {}
        for offset, window in batch.closed:
            if offset < fence:
                suppressed[offset] = suppressed.get(offset, 0) + 1
            else:
                closed.append(window)
        for offset, n in suppressed.items():
            log.warning("replayed_window_suppressed", partition=f"{state.tp[0]}/{state.tp[1]}", offset=offset,
                        windows=n)

    def _handle_line(self, state: PartitionState, message: Message, line: LogLine | BadRecord, record_time: float,
                     copy: bool, replay: bool, closed: list[Window]) -> None:
        """One parsed record (or bad one) into its partition's windows; windows it closes go to `closed`."""
        topic, partition = state.tp
        if isinstance(line, BadRecord):
            if copy:
                return  # dead-lettered once, from the primary copy
            self.metrics.parse_errors.labels(line.reason).inc()
            if not replay:
                self.publisher.dead_letter(state, message, line.reason, line.detail)
            return
        if self.session_windows:
            line = _routed_blocks(message, line)
        result = state.windower.add(line, record_time)
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
                self.publisher.dead_letter(state, message, reason, detail)
            if result.late_keys:
                self.metrics.late_lines.inc(len(result.late_keys))
                log.info("late_line", partition=f"{topic}/{partition}", offset=message.offset(),
                         keys=list(result.late_keys))
        if result.closed:
            if replay:
                log.warning("replayed_window_suppressed", partition=f"{topic}/{partition}", offset=message.offset(),
                            windows=len(result.closed))
            else:
                closed.extend(result.closed)

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
            self.publisher.dead_letter(state, message, "future_timestamp", ahead)


def _is_copy(message: Message) -> bool:
    """A second copy of a line naming blocks on several partitions (`produce --key block`, `repartition`)."""
    headers = message.headers()
    return bool(headers) and any(name == COPY_HEADER for name, _ in headers)


def _routed_blocks(message: Message, line: LogLine) -> LogLine:
    """A line routed by block id (`repartition`, `produce --key block`) belongs only to the blocks routed here."""
    headers = message.headers()
    if not headers:
        return line
    for name, value in headers:
        if name == BLOCKS_HEADER:
            return dataclasses.replace(line, block_ids=tuple(value.decode().split(",")) if value else ())
    return line
