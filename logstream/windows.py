"""Windowing engines: count windows and session windows keyed by block id, one engine per partition.

Both engines are pure functions of the line sequence they are fed (no wall clock), so a replay of
the same offsets closes the same windows at the same lines, with the same ids.

Count windows: a window starts every `stride` lines and closes when it holds `size` lines
(stride = size gives the paper's non-overlapping windows; a smaller stride slides). The caller may
*cut* a quiet partition (`CountWindower.cut()`, the pipeline's `--window-idle-s`): every open window
closes after the last line fed (reason `idle`) and the next line starts afresh. The cut is part of the
state a replay needs (`snapshot()`), so a replay closes the same windows at the same line, and says
they are the cut's (`AddResult.cut`, the flag of `CountBatch.closed`): held until the cut was committed,
they were never published, so they go out although below the commit's fence (the position when the
cut was taken: `partitions.PartitionState.idle_cut`).

Session windows (Kafka Streams' semantics, in event time): each block id named by a line has its
own session; a line naming several blocks joins each of them. With `stream_time` the largest event
time seen on the partition, a session closes
  - on a gap: a new line of the block arrives more than `gap` seconds after the session's last line
    (the session closes and the line opens the next one), or stream time passes
    `last + gap + grace` (the grace lets out-of-order lines still join);
  - on reaching `max_lines`;
  - when opening one more session would exceed `max_open` (the oldest-opened session closes first);
  - on `flush()` at the end of input;
  - on a cut (`SessionWindower.cut()`, the pipeline's `--session-idle-s`, off by default): every open
    session closes after the last line fed (reason `idle`); the pre-cut snapshot and the cut's offset
    are what a replay gets until the cut is committed, so it rebuilds those sessions and closes them
    at the same line.
A line far ahead of the stream (`EventTimeBound`: a node with a wrong clock) is dead-lettered or
clamped before it can move stream time, so it never drags the other lines into lateness.
A line for a block with no open session whose event time is already past `stream_time - gap - grace`
is *late*: its session would already have been closed. Late keys are reported to the caller, which
counts and logs them; a line that joined no window at all goes to the dead-letter topic.

Exact replay after a restart: the pipeline commits the offset of the oldest open window and keeps a
snapshot (open block ids with their first offsets, stream time, the event-time bound's state at the
oldest open session) for the offsets in between. Fed the
lines again from that offset up to the fence, `SessionWindower.restore()` rebuilds exactly the
sessions that were open, ignoring the lines of sessions that had already closed and been published.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from logstream.records import CloseReason, LogLine, Window
from logstream.settings import (
    DEFAULT_SESSION_GAP_S,
    FUTURE_CONFIRM_LINES,
    SESSION_GRACE_S,
    SESSION_MAX_LINES,
    SESSION_MAX_OPEN,
    WINDOW_SIZE,
)

if TYPE_CHECKING:
    from logstream.settings import Settings

_NO_TIME = float("-inf")
_ANY_TIME = float("inf")
_NEVER = float("nan")  # no event time is <= it

FuturePolicy = Literal["dead-letter", "clamp"]


def _fast_limit(bound: EventTimeBound | None) -> float:
    """The latest event time `bound` admits unchanged by its common case (`EventTimeBound.admit`): +inf
    without a bound, NaN (no time compares <= it) before the bound's first line."""
    if bound is None:
        return _ANY_TIME
    return _NEVER if bound.stream_time == _NO_TIME else bound.stream_time + bound.max_future


def _bound_state(before: tuple[float, float | None, int] | None) -> list[Any] | None:
    """`EventTimeBound.state()` from a tuple of its three numbers (None: no bound)."""
    if before is None:
        return None
    stream_time, record_time, run = before
    return [None if stream_time == _NO_TIME else stream_time, record_time, run]


@dataclass(slots=True)
class AddResult:
    """What feeding one line did: windows it closed and opened, block ids it was late for, windows joined."""

    closed: list[Window] = field(default_factory=list)
    late_keys: tuple[str, ...] = ()
    joined: int = 0
    opened: int = 0  # windows this line started (metrics: windows opened)
    future: bool = False  # refused by the event-time bound (the caller dead-letters it as future_timestamp)
    clamped: bool = False  # joined with its event time clamped by the event-time bound
    # how many of `closed`, the last ones, a recorded idle cut closed again on replay: held until the cut
    # was committed, never published, they go out although the line is below the fence (the position at
    # the cut)
    cut: int = 0


@dataclass(slots=True)
class SessionBatch:
    """What feeding a run of lines to a `SessionWindower` did (`add_batch`).

    `events`: `(index in the run, result)`, in order, for each line whose `add` result says more than
    "joined its windows" and more than "opened one window and joined it": it closed a window, opened
    several, was refused or clamped by the event-time bound, was late or unkeyed (joined none), or was
    replayed below the restore fence. `opened_at`: offsets, in order, of the lines that opened one window
    and did nothing else (most of the lines that open a window). A line in neither joined at least one
    open window and did nothing else: building no result for these lines is what saves the time."""

    events: list[tuple[int, AddResult]] = field(default_factory=list)
    opened_at: list[int] = field(default_factory=list)

    def add(self, index: int, offset: int, result: AddResult) -> None:
        """List one line's `add` result where it belongs (nowhere when it only joined open windows)."""
        noted = result.closed or result.future or result.clamped or result.late_keys or result.cut
        if not noted and result.opened == result.joined == 1:
            self.opened_at.append(offset)
        elif noted or result.opened or not result.joined:
            self.events.append((index, result))


@dataclass(slots=True)
class CountBatch:
    """What feeding a run of lines to a `CountWindower` did (`add_batch`).

    Every line joins at least one window. `closed`: (offset of the line that closed it, window, cut), in
    closing order, `cut` True for a window a recorded idle cut closed again on replay (`AddResult.cut`:
    never published, it goes out although below the fence); `opened_at`: offsets of the lines that
    started a window."""

    closed: list[tuple[int, Window, bool]] = field(default_factory=list)
    opened_at: list[int] = field(default_factory=list)


class EventTimeBound:
    """How far ahead of a partition's stream a line's event time may be (one wrong clock must not win).

    The reference is the stream time S (largest accepted event time) plus the record time that has
    passed since the line that set S was written (Kafka record timestamps, seconds): a partition that
    was quiet for two days accepts the next day's lines, while in a backfill (records written much
    faster than the events happened) the reference stays at S. A line more than `max_future` seconds
    past the reference is refused (`admit` returns None) or, with policy `clamp`, given the reference
    as its event time. `confirm` consecutive lines past the reference are a genuine jump (a gap in a
    sampled dump, a backfill over a quiet spell): the last of them is accepted and moves S. Before
    the first line there is no reference: it is accepted as is.

    State is three numbers (`state()` / `restore_state()`), kept with the windows so a replay from
    any cut makes the same decisions. A record time of 0 or less (none recorded) counts as unknown.
    """

    __slots__ = ("max_future", "policy", "confirm", "stream_time", "stream_record_time", "run")

    def __init__(self, max_future: float, policy: FuturePolicy = "dead-letter",
                 confirm: int = FUTURE_CONFIRM_LINES) -> None:
        if max_future <= 0:
            raise ValueError(f"max_future must be positive, got {max_future}")
        if confirm < 2:
            raise ValueError(f"confirm must be at least 2 (1 would accept every line), got {confirm}")
        self.max_future, self.policy, self.confirm = max_future, policy, confirm
        self.stream_time = _NO_TIME
        self.stream_record_time: float | None = None
        self.run = 0  # consecutive lines past the reference so far

    def admit(self, event_time: float, record_time: float | None = None) -> float | None:
        """The event time the line enters the windows with, or None when it is refused."""
        if record_time is not None and record_time <= 0:
            record_time = None
        stream = self.stream_time
        if stream != _NO_TIME and event_time <= stream + self.max_future:
            # the common case, within the bound before any record-time allowance (the reference is >= S)
            self.run = 0
            if event_time > stream:
                self.stream_time = event_time
                self.stream_record_time = record_time
            return event_time
        if stream == _NO_TIME:
            self._advance(event_time, record_time)
            return event_time
        reference = self.stream_time
        if record_time is not None and self.stream_record_time is not None and record_time > self.stream_record_time:
            reference += record_time - self.stream_record_time
        if event_time <= reference + self.max_future:
            self.run = 0
            self._advance(event_time, record_time)
            return event_time
        self.run += 1
        if self.run >= self.confirm:  # not one clock: the stream itself jumped
            self.run = 0
            self._advance(event_time, record_time)
            return event_time
        if self.policy == "clamp":
            self._advance(reference, record_time)
            return reference
        return None

    def _advance(self, event_time: float, record_time: float | None) -> None:
        if event_time > self.stream_time:
            self.stream_time = event_time
            self.stream_record_time = record_time

    def state(self) -> list[float | int | None]:
        return [None if self.stream_time == _NO_TIME else self.stream_time, self.stream_record_time, self.run]

    def restore_state(self, state: list[Any]) -> None:
        stream_time, record_time, run = state
        self.stream_time = _NO_TIME if stream_time is None else float(stream_time)
        self.stream_record_time = None if record_time is None else float(record_time)
        self.run = int(run)


class Windower(Protocol):
    """Per-partition window state, implemented by `CountWindower` and `SessionWindower`.

    Not thread-safe: owned by the poll loop (consumer) or the dump reader (trainer). No call blocks."""

    def add(self, line: LogLine, record_time: float | None = None) -> AddResult:
        """Feed the next line of the partition (offsets increase); `record_time`: its Kafka timestamp, seconds."""

    def flush(self) -> list[Window]:
        """Close every open window (end of input), oldest first."""

    def cut(self) -> list[Window]:
        """Idle close: close every open window after the last line fed (reason idle); the cut is kept in
        `snapshot()` until `forget_before` passes it, so a replay closes the same windows."""

    def oldest_open_offset(self) -> int | None:
        """First offset of the oldest open window: replay must start there (None when none is open)."""

    def forget_before(self, offset: int) -> None:
        """State a replay from `offset` (a committed offset) no longer needs may go."""

    def snapshot(self) -> dict[str, Any] | None:
        """What a replay from `oldest_open_offset()` needs besides the lines (None: nothing)."""

    def restore(self, snapshot: dict[str, Any], fence: int) -> None:
        """Before a replay: the state `snapshot()` gave; lines below `fence` were handled already."""

    @property
    def open_windows(self) -> int:
        """Windows open now."""

    @property
    def last_offset(self) -> int | None:
        """Offset of the last line fed (None before the first)."""


class CountWindower:
    """Windows of `size` lines starting every `stride` lines; quiet partitions can be cut (`cut()`)."""

    def __init__(self, topic: str, partition: int, size: int = WINDOW_SIZE, stride: int | None = None) -> None:
        stride = stride or size
        if not 1 <= stride <= size:
            raise ValueError(f"stride must be in 1..size ({size}), got {stride}")
        self.topic, self.partition, self.size, self.stride = topic, partition, size, stride
        self._key = f"{topic}/{partition}"
        self._open: deque[list[LogLine]] = deque()
        self._until_next_start = 0
        self._last_offset: int | None = None
        self._cuts: set[int] = set()  # offsets after which a cut closed every open window

    def add(self, line: LogLine, record_time: float | None = None) -> AddResult:
        opened = 0
        if self._until_next_start == 0:
            self._open.append([])
            self._until_next_start = self.stride
            opened = 1
        self._until_next_start -= 1
        for lines in self._open:
            lines.append(line)
        self._last_offset = line.offset
        result = AddResult(joined=len(self._open), opened=opened)
        if len(self._open[0]) == self.size:
            result.closed.append(self._window(self._open.popleft(), "size"))
        if line.offset in self._cuts:  # replaying past a recorded cut: close where it closed
            cut = self._close_all("idle")
            result.closed.extend(cut)
            result.cut = len(cut)
        return result

    def add_batch(self, lines: Sequence[LogLine]) -> CountBatch:
        """Feed consecutive lines at once: what `add` on each in turn does, cut by offsets.

        The lines are appended to the open windows in runs (up to the next window start, the next
        full window or the next recorded cut), not one by one."""
        batch = CountBatch()
        size, stride, cuts, open_ = self.size, self.stride, self._cuts, self._open
        i, n = 0, len(lines)
        while i < n:
            if self._until_next_start == 0:
                open_.append([])
                self._until_next_start = stride
                batch.opened_at.append(lines[i].offset)
            step = min(self._until_next_start, size - len(open_[0]), n - i)
            chunk = lines[i:i + step]
            if cuts:
                for j, line in enumerate(chunk):
                    if line.offset in cuts:
                        chunk = chunk[:j + 1]
                        break
                step = len(chunk)
            for window_lines in open_:
                window_lines.extend(chunk)
            self._until_next_start -= step
            i += step
            last = chunk[-1].offset
            self._last_offset = last
            if len(open_[0]) == size:
                batch.closed.append((last, self._window(open_.popleft(), "size"), False))
            if last in cuts:  # replaying past a recorded cut: close where it closed
                batch.closed.extend((last, window, True) for window in self._close_all("idle"))
        return batch

    def cut(self) -> list[Window]:
        """Close every open window after the last line fed (reason `idle`); the cut is kept for replay
        (`snapshot()`) until `forget_before` passes it, and its line, fed again, closes the same windows
        (`AddResult.cut`). With nothing open, returns [] and records no cut."""
        if not self._open or self._last_offset is None:
            return []
        self._cuts.add(self._last_offset)
        return self._close_all("idle")

    @property
    def last_offset(self) -> int | None:
        """Offset of the last line fed (where a cut now would fall)."""
        return self._last_offset

    def forget_before(self, offset: int) -> None:
        """Cuts below a committed offset are never replayed again."""
        self._cuts = {cut for cut in self._cuts if cut >= offset}

    def flush(self) -> list[Window]:
        return self._close_all("end_of_input")

    def oldest_open_offset(self) -> int | None:
        return self._open[0][0].offset if self._open else None

    def snapshot(self) -> dict[str, Any] | None:
        # windows start at the replay offset and every `stride` lines after, except after a cut
        return {"cuts": sorted(self._cuts)} if self._cuts else None

    def restore(self, snapshot: dict[str, Any], fence: int) -> None:
        """The recorded cuts: a replay closes every open window at each of their lines again. `fence` is
        not needed here: the caller suppresses windows closed below it, but for a cut's (`AddResult.cut`)."""
        self._cuts = {int(offset) for offset in snapshot.get("cuts", ())}

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def _close_all(self, reason: CloseReason) -> list[Window]:
        windows = [self._window(lines, reason) for lines in self._open]
        self._open.clear()
        self._until_next_start = 0
        return windows

    def _window(self, lines: list[LogLine], reason: CloseReason) -> Window:
        return Window("count", self._key, self.topic, self.partition, lines, reason)


class _Session:
    __slots__ = ("lines", "last_event", "generation", "bound_before")

    def __init__(self, generation: int, bound_before: list[Any] | None, last_event: float = _NO_TIME) -> None:
        self.lines: list[LogLine] = []
        self.last_event = last_event
        self.generation = generation
        self.bound_before = bound_before  # the event-time bound's state before the first line (replay start)


class SessionWindower:
    """Session windows keyed by block id, closed in event time (see the module docstring)."""

    def __init__(
        self,
        topic: str,
        partition: int,
        gap: float = DEFAULT_SESSION_GAP_S,
        grace: float = SESSION_GRACE_S,
        max_lines: int = SESSION_MAX_LINES,
        max_open: int = SESSION_MAX_OPEN,
        bound: EventTimeBound | None = None,
    ) -> None:
        self.topic, self.partition = topic, partition
        self.gap, self.grace, self.max_lines, self.max_open = gap, grace, max_lines, max_open
        self.bound = bound
        self._open: dict[str, _Session] = {}  # insertion order = opening order = first-offset order
        # (deadline, generation, key): for each open session at least one entry, its deadline at most the
        # session's (`_expire` explains why that is enough); entries of closed sessions are skipped
        self._expiry: list[tuple[float, int, str]] = []
        self._generation = 0
        self._stream_time = _NO_TIME
        self._restoring: dict[str, int] | None = None
        self._restore_snapshot: dict[str, Any] | None = None
        self._fence = 0
        self._last_offset: int | None = None
        self._cut: tuple[int, dict[str, Any] | None] | None = None  # (offset, snapshot before it) until committed

    # --- replay -------------------------------------------------------------------------------

    def restore(self, snapshot: dict[str, Any], fence: int) -> None:
        """Rebuild the sessions of `snapshot` from the lines replayed below offset `fence`. A snapshot
        with a cut (taken before the cut was committed; `fence` is then the position when the cut was
        taken, past the cut's line) replays that line too and closes the rebuilt sessions after it,
        reason idle: the windows the cut closed (`AddResult.cut`)."""
        self._restoring = {key: int(first) for key, first in snapshot.get("open", [])}
        cuts = snapshot.get("cuts") or []
        self._cut = (int(cuts[0]), None) if cuts else None
        self._restore_snapshot = snapshot
        # a cut's line is replayed too (the snapshot is the state after it), then the cut closes what it rebuilt
        self._fence = fence if self._cut is None else max(fence, self._cut[0] + 1)
        stream_time = snapshot.get("stream_time")
        self._stream_time = _NO_TIME if stream_time is None else float(stream_time)
        if self.bound is not None and snapshot.get("bound") is not None:
            self.bound.restore_state(snapshot["bound"])

    @property
    def restoring(self) -> bool:
        return self._restoring is not None

    def finish_restore(self) -> list[str]:
        """Leave replay mode; returns the block ids whose lines were not found again (lost to retention)."""
        if self._restoring is None:
            return []
        missing = [key for key in self._restoring if key not in self._open]
        self._restoring = None
        self._restore_snapshot = None
        for key, session in self._open.items():
            self._schedule(key, session)
        return missing

    def _replay(self, line: LogLine, bound_before: list[Any] | None) -> None:
        assert self._restoring is not None
        for key in line.block_ids:
            first = self._restoring.get(key)
            if first is None or line.offset < first:
                continue  # that block's window had closed and was published before the restart
            session = self._open.get(key)
            if session is None:
                self._generation += 1
                session = self._open[key] = _Session(self._generation, bound_before)
            session.lines.append(line)
            session.last_event = max(session.last_event, line.event_time)

    # --- streaming ----------------------------------------------------------------------------

    def add(self, line: LogLine, record_time: float | None = None) -> AddResult:
        before = self._bound_before()
        admitted = self._admit(line, record_time)
        if admitted is None:
            return AddResult(future=True)
        line, clamped = admitted
        self._last_offset = line.offset
        if self._restoring is not None:
            if line.offset < self._fence:
                self._replay(line, _bound_state(before))
                if self._cut is not None and line.offset == self._cut[0]:
                    return self._replay_cut(line)
                return AddResult()
            self.finish_restore()
        result = self._join(line, before, clamped)
        # a line that only joined its windows joined one per block id (none was late)
        return result if result is not None else AddResult(joined=len(line.block_ids))

    def add_batch(self, lines: Sequence[LogLine], record_times: Sequence[float | None]) -> SessionBatch:
        """Feed consecutive lines at once: what `add` on each in turn does, listed as `SessionBatch` says.

        `record_times` (Kafka timestamps, seconds) is parallel to `lines`."""
        batch = SessionBatch()
        start = 0
        while start < len(lines) and self._restoring is not None:  # replaying: the per-line path (once per assignment)
            line = lines[start]
            batch.add(start, line.offset, self.add(line, record_times[start]))
            start += 1
        if start < len(lines):
            self._stream_batch(lines, record_times, start, batch)
        return batch

    def _stream_batch(self, lines: Sequence[LogLine], record_times: Sequence[float | None], start: int,
                      batch: SessionBatch) -> None:
        """`add_batch` from line `start` on, past any replay: `_admit` then `_join` on each line, the results
        listed in `batch`.

        Most lines take a fast path instead: a line of one block id that the event-time bound admits
        unchanged, when what `_join` would do is decided by the line's own session alone. If the line moves
        stream time past the earliest expiry entry, `_expire` runs first, as in `_join`; then the line
        - joins its open session when that takes it without a close (no gap, below `max_lines`, not
          expired just now): listed nowhere (as `_join` returning None), or as an event with the windows
          the expiry closed;
        - or opens its block's session, when it has none (or the expiry just closed it), the line is not
          late and one more session does not exceed `max_open`: listed in `opened_at`, or as an event with
          the windows the expiry closed.
        The path does just those steps of `_admit` and `_join`, inline; every other line takes them."""
        open_, expiry, gap, grace, bound = self._open, self._expiry, self.gap, self.grace, self.bound
        open_get, opened_at, events = open_.get, batch.opened_at, batch.events
        bound_limit = _fast_limit(bound)
        below_cap = self.max_lines - 1  # a session holding fewer lines takes one more without closing
        can_open = below_cap > 0  # with max_lines 1 a session closes on its first line (`_join`)
        stream_time = self._stream_time
        last = -1  # the index of the last line admitted
        for index in range(start, len(lines)):
            line = lines[index]
            now = line.event_time
            keys = line.block_ids
            if len(keys) == 1 and now <= bound_limit:
                session = open_get(keys[0])
                due = now > stream_time and bool(expiry) and expiry[0][0] < now  # `_join` would run `_expire` first
                expiring = due and session is not None and session.last_event + gap + grace < now  # it closes
                if session is not None and not expiring:
                    fast = now <= session.last_event + gap and len(session.lines) < below_cap
                else:  # opens one: not late, within max_open (the expiring session makes room), no close at once.
                    # An engine restored under a lower max_open may hold more: then `_join` closes for the cap.
                    fast = can_open and now + gap + grace >= stream_time and len(open_) - expiring < self.max_open
                if fast:
                    bound_before = None
                    if bound is not None:  # `EventTimeBound.admit`'s common case: it admits `now` unchanged
                        if session is None or expiring:
                            bound_before = bound.state()  # where a replay of the new session starts
                        if now > bound.stream_time:
                            bound.admit(now, record_times[index])  # moves the bound's stream time
                            bound_limit = _fast_limit(bound)
                        else:
                            bound.run = 0  # all that admit does for a line not past its stream time
                    if now > stream_time:
                        stream_time = self._stream_time = now
                    closed: list[Window] = []
                    if due:
                        self._expire(closed)
                    if session is None or expiring:
                        self._generation += 1
                        session = open_[keys[0]] = _Session(self._generation, bound_before, now)
                        self._schedule(keys[0], session)
                        if closed:
                            events.append((index, AddResult(closed, (), 1, 1)))
                        else:
                            opened_at.append(line.offset)
                    else:
                        if now > session.last_event:
                            session.last_event = now  # its expiry entry stays (see `_expire`)
                        if closed:
                            events.append((index, AddResult(closed, (), 1, 0)))
                    session.lines.append(line)
                    last = index
                    continue
            before = self._bound_before()
            admitted = self._admit(line, record_times[index])
            bound_limit = _fast_limit(bound)
            if admitted is None:
                events.append((index, AddResult(future=True)))
                continue
            line, clamped = admitted
            last = index
            joined = self._join(line, before, clamped)
            stream_time = self._stream_time
            if joined is not None:
                batch.add(index, line.offset, joined)
        if last >= 0:
            self._last_offset = lines[last].offset

    def _replay_cut(self, line: LogLine) -> AddResult:
        """The line a recorded cut came after, replayed: the sessions rebuilt up to it are the ones the
        cut closed; they close again (reason idle) and the replay ends."""
        self.finish_restore()
        windows = self._close_all("idle")
        return AddResult(windows, joined=len(line.block_ids), cut=len(windows))

    def _bound_before(self) -> tuple[float, float | None, int] | None:
        """The event-time bound's state before a line, as a cheap tuple (`_bound_state` makes it a snapshot's list)."""
        bound = self.bound
        return None if bound is None else (bound.stream_time, bound.stream_record_time, bound.run)

    def _admit(self, line: LogLine, record_time: float | None) -> tuple[LogLine, bool] | None:
        """The line as it enters the windows and whether its event time was clamped; None when refused."""
        if self.bound is None:
            return line, False
        admitted = self.bound.admit(line.event_time, record_time)
        if admitted is None:
            return None
        if admitted != line.event_time:
            return line._replace(event_time=admitted), True
        return line, False

    def _join(self, line: LogLine, before: tuple[float, float | None, int] | None, clamped: bool) -> AddResult | None:
        """An admitted line joins (or opens) the sessions of its block ids; windows it closes (gap, cap,
        size, expiry) are in the result. None when it only joined windows and nothing else happened."""
        open_, gap = self._open, self.gap
        now = line.event_time
        closed: list[Window] = []
        if now > self._stream_time:
            self._stream_time = now
            if self._expiry and self._expiry[0][0] < now:
                self._expire(closed)
        late: list[str] = []
        joined = opened = 0
        bound_before: list[Any] | None = None  # made once, only if a session opens
        for key in line.block_ids:
            session = open_.get(key)
            if session is not None and now > session.last_event + gap:
                closed.append(self._close(key, "gap"))
                session = None
            if session is None:
                if now + gap + self.grace < self._stream_time:
                    late.append(key)
                    continue
                if len(open_) >= self.max_open:
                    closed.append(self._close(next(iter(open_)), "cap"))
                self._generation += 1
                if bound_before is None:
                    bound_before = _bound_state(before)
                session = open_[key] = _Session(self._generation, bound_before, now)
                self._schedule(key, session)
                opened += 1
            elif now > session.last_event:
                session.last_event = now  # its expiry entry stays (see `_expire`)
            session.lines.append(line)
            joined += 1
            if len(session.lines) >= self.max_lines:
                closed.append(self._close(key, "max_size"))
        if closed or opened or clamped or late or not joined:
            return AddResult(closed, tuple(late), joined, opened, clamped=clamped)
        return None

    def flush(self) -> list[Window]:
        self.finish_restore()
        return self._close_all("end_of_input")

    def cut(self) -> list[Window]:
        """Close every open session after the last line fed (reason idle), oldest first.

        Until `forget_before` passes the cut (its commit), `snapshot()` is the state before it plus the
        cut's offset: a replay rebuilds the sessions and closes them at the same line. The caller has
        fed every line it read (a replay still under way ends here); with nothing open, returns []."""
        if self._restoring is not None:
            self.finish_restore()  # the caller cuts a partition read to its end: the replay is over
        if not self._open or self._last_offset is None:
            return []
        self._cut = (self._last_offset, self._state())
        return self._close_all("idle")

    def forget_before(self, offset: int) -> None:
        """A committed offset past the cut: no replay reaches it again."""
        if self._cut is not None and self._cut[0] < offset:
            self._cut = None

    @property
    def last_offset(self) -> int | None:
        return self._last_offset

    def oldest_open_offset(self) -> int | None:
        if self._restoring is not None:
            return min(self._restoring.values(), default=None)
        for session in self._open.values():
            return session.lines[0].offset
        return None

    def snapshot(self) -> dict[str, Any] | None:
        if self._restore_snapshot is not None:
            return self._restore_snapshot  # not rebuilt yet: the state is still the restored one
        if self._cut is not None and self._cut[1] is not None:  # a cut not yet committed: the state before it
            return {**self._cut[1], "cuts": [self._cut[0]]}
        return self._state()

    def _state(self) -> dict[str, Any]:
        """The open sessions, stream time and the bound's state where a replay starts, as now."""
        snapshot: dict[str, Any] = {
            "stream_time": self._stream_time if self._stream_time != _NO_TIME else None,
            "open": [[key, session.lines[0].offset] for key, session in self._open.items()],
        }
        if self.bound is not None:  # its state where the replay starts: at the oldest open session, else now
            oldest = next(iter(self._open.values()), None)
            snapshot["bound"] = oldest.bound_before if oldest is not None else self.bound.state()
        return snapshot

    @property
    def open_windows(self) -> int:
        return len(self._restoring) if self._restoring is not None else len(self._open)

    @property
    def stream_time(self) -> float | None:
        return None if self._stream_time == _NO_TIME else self._stream_time

    # --- internals ----------------------------------------------------------------------------

    def _schedule(self, key: str, session: _Session) -> None:
        """Give a session its expiry entry: once, when it opens (or is rebuilt by a replay), not each time
        its last event moves (`_expire` re-pushes an entry found early)."""
        expiry = self._expiry
        heapq.heappush(expiry, (session.last_event + self.gap + self.grace, session.generation, key))
        if len(expiry) > 4 * len(self._open) + 1024:  # mostly entries of closed sessions, not yet reached
            expiry[:] = [(s.last_event + self.gap + self.grace, s.generation, k) for k, s in self._open.items()]
            heapq.heapify(expiry)  # in place: `_stream_batch` holds the list

    def _expire(self, closed: list[Window]) -> None:
        """Close (reason gap), in order of (deadline, generation), every session whose deadline
        `last_event + gap + grace` is before stream time.

        An entry is pushed when a session opens, not when it is extended, so an entry's deadline can be
        earlier than its session's: the invariant is only that every open session has an entry whose
        deadline is at most its own (last_event only grows). An entry found early is replaced by the true
        deadline. The close order is still (deadline, generation): when the heap's least entry is a
        session's true deadline D with generation g, every other open session's entries are >= (D, g),
        so its deadline is >= D, and if equal to D its entry is exactly (D, its generation) with that
        generation > g. And the set closed is the same: a session whose deadline is before stream time has
        an entry before it too, popped here and, if early, pushed again with that deadline, popped again."""
        expiry, open_, gap, grace, stream_time = self._expiry, self._open, self.gap, self.grace, self._stream_time
        while expiry and expiry[0][0] < stream_time:
            deadline, generation, key = expiry[0]
            session = open_.get(key)
            if session is None or session.generation != generation:
                heapq.heappop(expiry)  # closed or reopened since
                continue
            due = session.last_event + gap + grace
            if due != deadline:  # extended since it was pushed: its true deadline goes in instead
                heapq.heapreplace(expiry, (due, generation, key))
                continue
            heapq.heappop(expiry)
            closed.append(self._close(key, "gap"))

    def _close(self, key: str, reason: CloseReason) -> Window:
        return self._window(key, self._open.pop(key), reason)

    def _close_all(self, reason: CloseReason) -> list[Window]:
        """Every open session, oldest-opened first."""
        windows = [self._window(key, session, reason) for key, session in self._open.items()]
        self._open.clear()
        self._expiry.clear()
        return windows

    def _window(self, key: str, session: _Session, reason: CloseReason) -> Window:
        return Window("session", key, self.topic, self.partition, session.lines, reason)


def window_options(settings: Settings) -> dict[str, Any]:
    """`make_windower` keyword options from settings: the one translation for the consumer and the trainer.

    Session options include the event-time bound (`max_future`, seconds; None: no bound) for the
    effective session gap (one day for HDFS, 300 s otherwise)."""
    gap = settings.effective_session_gap
    return {
        "size": settings.window_size, "stride": settings.window_stride, "gap": gap, "grace": settings.session_grace,
        "max_lines": settings.session_max_lines, "max_open": settings.session_max_open,
        "max_future": settings.future_bound(gap), "future_policy": settings.future_policy,
        "future_confirm": settings.future_confirm_lines,
    }


def make_windower(
    kind: str,
    topic: str,
    partition: int,
    *,
    size: int = WINDOW_SIZE,
    stride: int | None = None,
    gap: float = DEFAULT_SESSION_GAP_S,
    grace: float = SESSION_GRACE_S,
    max_lines: int = SESSION_MAX_LINES,
    max_open: int = SESSION_MAX_OPEN,
    max_future: float | None = None,
    future_policy: FuturePolicy = "dead-letter",
    future_confirm: int = FUTURE_CONFIRM_LINES,
) -> Windower:
    """The engine for one partition, by window kind (`max_future`: seconds, session windows; None: no bound)."""
    if kind == "count":
        return CountWindower(topic, partition, size, stride)
    if kind == "session":
        bound = EventTimeBound(max_future, future_policy, future_confirm) if max_future else None
        return SessionWindower(topic, partition, gap, grace, max_lines, max_open, bound)
    raise ValueError(f"unknown window kind {kind!r}; choose count or session")
