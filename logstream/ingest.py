"""Input records -> lines -> windows, for the partitions the poll loop owns.

A record is parsed into a line (or dead-lettered as a bad record), joined to its partition's
windows, and the windows it closed are handed on for scoring. Lines below a partition's replay
fence are replayed: they rebuild windows but repeat no side effect (dead letters, alerts, metrics
of new work) already done by an earlier owner.

Offsets of a partition only grow while it is owned, but for one case: the client resets its
position backwards (auto.offset.reset) when the offset it fetches is beyond the log's end, that is
when the topic was deleted and created again or the log truncated. The records from there are a new
log, not a replay: the partition starts afresh at that offset (`PartitionState.restart_log`, logged
as `offset_reset`) instead of suppressing them below a fence that belongs to the old log.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import cast

import numpy as np
from confluent_kafka import KafkaError, Message

from logstream.deadletters import DeadLetterWatch
from logstream.errors import FatalFlag
from logstream.kafka import fatal_reason, is_fatal
from logstream.logs import LogThrottle, get_logger
from logstream.metrics import Metrics
from logstream.parsing import BadRecord, LineParser
from logstream.partitions import TP, PartitionState
from logstream.publishing import Publisher
from logstream.records import LogLine, Window
from logstream.routing import BLOCKS_HEADER, COPY_HEADER
from logstream.settings import Settings
from logstream.windows import AddResult, CountWindower, SessionWindower, make_windower, window_options

log = get_logger(__name__)

_MILLIS = itemgetter(1)  # a record's timestamp (type, milliseconds): the milliseconds


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
        (`LineParser.parse_batch`), fed to its windows in one call (`CountWindower.add_batch`,
        `SessionWindower.add_batch`), and the windows they closed handed on a scoring batch at a
        time. The result is what handling the records one at a time gives."""
        batches: dict[TP, list[Message]] = {}
        eof_after: dict[TP, int] = {}  # partition -> its records in this batch before its end-of-partition event
        single = _one_partition(messages)
        if single is not None:  # the common case: no events, one partition; no per-record sorting
            if single in parts:
                batches[single] = messages
        else:
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
        if is_fatal(error):
            self.fatal.set(fatal_reason(error, self.settings))  # e.g. a newer instance took our static id
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
        """Consecutive records of one partition, each run of increasing offsets in turn (`_handle_run`); a
        run starting below the position read so far is a new log (`_offset_reset`)."""
        offsets = list(map(Message.offset, batch))
        if offsets == sorted(offsets) and (state.position is None or offsets[0] >= state.position):
            self._handle_run(state, batch, offsets)  # the common case: one run, past the position
            return
        start = 0
        for end in [*(i for i in range(1, len(offsets)) if offsets[i] <= offsets[i - 1]), len(offsets)]:
            if state.position is not None and offsets[start] < state.position:
                self._offset_reset(state, offsets[start])
            self._handle_run(state, batch[start:end], offsets[start:end])
            start = end

    def _offset_reset(self, state: PartitionState, offset: int) -> None:
        """A record at `offset`, below the position: the partition's log starts afresh there. The old log's
        windows still open (or held by an idle cut) are judged now; every record from `offset` is new."""
        topic, partition = state.tp
        log.warning("offset_reset", partition=f"{topic}/{partition}", offset=offset, position=state.position,
                    fence=state.fence, open_windows=state.windower.open_windows,
                    consequence="the client reset its offset below what was read (the topic was recreated or its "
                    "log truncated): the records from this offset are judged as new, with no fence; the old "
                    "log's open windows are judged now")
        self.parser.forget(topic, partition)
        windows = state.restart_log(offset, make_windower(self.settings.window, topic, partition,
                                                          **window_options(self.settings)))
        if windows:
            self.submit(state, windows)

    def _handle_run(self, state: PartitionState, batch: list[Message], offsets: list[int]) -> None:
        """Records of one partition with increasing offsets: position and replay counts, one parse, then the windows."""
        topic, partition = state.tp
        state.position = offsets[-1] + 1
        state.eof = False
        if state.origin is None:
            state.origin = offsets[0]
        fence = state.fence
        if offsets[0] < fence:
            state.replay_counter.inc(bisect.bisect_left(offsets, fence))
        # A multi-block line counts once, in its primary copy (see routing.route): with count windows a
        # copy is skipped before parsing, as it never reached the parser.
        headers = any(map(Message.headers, batch))
        copies = [_is_copy(m) for m in batch] if headers else [False] * len(batch)
        if headers and not self.session_windows:
            keep = [i for i, copy in enumerate(copies) if not copy]
            batch, offsets, copies = [batch[i] for i in keep], [offsets[i] for i in keep], [False] * len(keep)
        if not batch:
            return
        if self.session_windows or self.parser.reads_record_times:  # the event-time bound or the parser reads them
            # milliseconds / 1000.0 as Python divides them (int to double, then the division), for the batch at once
            times = (np.fromiter(map(_MILLIS, map(Message.timestamp, batch)), np.float64, len(batch)) / 1000.0).tolist()
        else:
            times = [0.0] * len(batch)
        parsed = self.parser.parse_batch(list(map(Message.value, batch)), topic=topic, partition=partition,
                                         offsets=offsets, record_times=times)
        if not self.session_windows:  # count windows (settings.window): the engine is a CountWindower
            closed: list[Window] = []
            self._count_lines(state, cast(CountWindower, state.windower), batch, parsed, closed)
            if closed:
                self.submit(state, closed)
        else:
            self._session_lines(state, cast(SessionWindower, state.windower), batch, copies, parsed, times, headers)

    def _count_lines(self, state: PartitionState, windower: CountWindower, batch: list[Message],
                     parsed: list[LogLine | BadRecord], closed: list[Window]) -> None:
        """Count windows take the batch's good lines in one call (`CountWindower.add_batch`; no line is
        ever late, unkeyed or from the future there), with the side effects `add` on each line would
        have: bad records counted and dead-lettered in place, windows opened counted, windows closed
        below the replay fence suppressed, but for a replayed idle cut's (held, never published: they go
        now, as `_apply` does with `AddResult.cut`)."""
        fence = state.fence
        good = cast(list[LogLine], parsed)
        if _has_bad(parsed):
            good = [line for line in parsed if not isinstance(line, BadRecord)]
            for message, line in zip(batch, parsed):  # copies never reach count windows
                if isinstance(line, BadRecord):
                    self._bad_record(state, message, line, message.offset() < fence)
        if not good:
            return
        result = windower.add_batch(good)
        state.last_line_at = time.monotonic()
        opened = _at_or_after(result.opened_at, fence)
        if opened:
            self.metrics.windows_opened.labels(self.settings.window).inc(opened)
        suppressed: dict[int, int] = {}
        for offset, window, cut in result.closed:
            if offset < fence and not cut:
                suppressed[offset] = suppressed.get(offset, 0) + 1
            else:
                closed.append(window)
        for offset, n in suppressed.items():
            log.warning("replayed_window_suppressed", partition=f"{state.tp[0]}/{state.tp[1]}", offset=offset,
                        windows=n)

    def _session_lines(self, state: PartitionState, windower: SessionWindower, batch: list[Message],
                       copies: list[bool], parsed: list[LogLine | BadRecord], times: list[float],
                       headers: bool) -> None:
        """Session windows take the batch's good lines in one call (`SessionWindower.add_batch`); the lines
        it lists as events (closed windows, refused, clamped, late, unkeyed, replayed) and the bad records
        then get their side effects in offset order, as `_apply` and `_bad_record` give them line by line,
        and the closed windows are handed on a scoring batch at a time. Windows opened are counted once
        for the batch, not line by line (the lines that only opened one are listed apart, by offset, in
        `SessionBatch.opened_at`): the metric ends the same."""
        good: Sequence[int]
        if _has_bad(parsed):
            good = [i for i, line in enumerate(parsed) if not isinstance(line, BadRecord)]
            lines = cast(list[LogLine], [parsed[i] for i in good])
            good_times = [times[i] for i in good]
        else:  # the common case, every record a line: no copies of the lists
            good, lines, good_times = range(len(parsed)), cast(list[LogLine], parsed), times
        if headers:  # routed by block id: a line belongs only to the blocks routed here
            lines = [_routed_blocks(batch[i], line) for i, line in zip(good, lines)]
        added = windower.add_batch(lines, good_times)
        events = added.events
        if len(good) < len(parsed):  # bad records take their place among the events, in offset order
            bad = [(i, line) for i, (line, copy) in enumerate(zip(parsed, copies))
                   if isinstance(line, BadRecord) and not copy]  # a copy is dead-lettered from its primary
            steps = heapq.merge(((good[k], lines[k], result) for k, result in events),
                                ((i, line, None) for i, line in bad), key=lambda step: step[0])
        else:
            steps = ((good[k], lines[k], result) for k, result in events)
        if sum(1 for _, result in events if result.future) < len(lines):
            state.last_line_at = time.monotonic()
        fence, enough = state.fence, self.settings.batch_size  # a scoring batch's worth is handed on at once
        closed: list[Window] = []
        opened = _at_or_after(added.opened_at, fence)  # lines that only opened a window: new work unless replayed
        for i, line, result in steps:
            message = batch[i]
            if result is None:
                self._bad_record(state, message, cast(BadRecord, line), message.offset() < fence)
                continue
            opened += self._apply(state, message, cast(LogLine, line), result, message.offset() < fence, closed)
            if len(closed) >= enough:
                self.submit(state, closed)
                closed = []
        if closed:
            self.submit(state, closed)
        if opened:
            self.metrics.windows_opened.labels(self.settings.window).inc(opened)

    def _bad_record(self, state: PartitionState, message: Message, bad: BadRecord, replay: bool) -> None:
        """A record that is no line: counted, and dead-lettered unless an earlier owner did."""
        self.metrics.parse_errors.labels(bad.reason).inc()
        if not replay:
            self.publisher.dead_letter(state, message, bad.reason, bad.detail)

    def _apply(self, state: PartitionState, message: Message, line: LogLine, result: AddResult, replay: bool,
               closed: list[Window]) -> int:
        """The side effects of one line's session `AddResult`: future and late lines, metrics, closed windows.
        Returns the windows it opened that count as new work (none when replayed), for the caller to count."""
        topic, partition = state.tp
        if result.future or result.clamped:
            self._count_future(state, message, line, result.future, replay)
            if result.future:
                return 0
        if not replay:
            if result.joined == 0:
                reason = "late" if result.late_keys else "unkeyed"
                detail = f"late for {', '.join(result.late_keys)}" if result.late_keys else "no block id in line"
                self.publisher.dead_letter(state, message, reason, detail)
            if result.late_keys:
                self.metrics.late_lines.inc(len(result.late_keys))
                log.info("late_line", partition=f"{topic}/{partition}", offset=message.offset(),
                         keys=list(result.late_keys))
        if result.closed:
            if replay:  # a replayed cut's windows (the last `cut`) were held, never published: they go now
                suppressed = len(result.closed) - result.cut
                if suppressed:
                    log.warning("replayed_window_suppressed", partition=f"{topic}/{partition}",
                                offset=message.offset(), windows=suppressed)
                closed.extend(result.closed[suppressed:])
            else:
                closed.extend(result.closed)
        return 0 if replay else result.opened

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


def _has_bad(parsed: list[LogLine | BadRecord]) -> bool:
    """Whether a parsed batch holds a bad record: one pass at C speed (most batches have none, and then
    the parsed list is the lines as they are)."""
    return any(map(isinstance, parsed, repeat(BadRecord)))


def _at_or_after(offsets: list[int], fence: int) -> int:
    """How many of `offsets` (increasing) are at or past `fence`: the windows they opened are new work."""
    return len(offsets) - bisect.bisect_left(offsets, fence)


def _one_partition(messages: list[Message]) -> TP | None:
    """The partition of a batch of records of one partition and no events (errors, ends), else None."""
    if any(map(Message.error, messages)):
        return None
    topics, partitions = set(map(Message.topic, messages)), set(map(Message.partition, messages))
    if len(topics) != 1 or len(partitions) != 1:
        return None
    return topics.pop(), partitions.pop()


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
            return line._replace(block_ids=tuple(value.decode().split(",")) if value else ())
    return line
