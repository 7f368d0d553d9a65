"""Differential: the session engine against a reference model of its per-line semantics.

The reference is `SessionWindower` with the expiry bookkeeping it had before the batch fast path:
an expiry entry pushed each time a session's last event moves, stale entries skipped, fed line by
line with `add`. The engine under test gets the same lines through `add_batch` (its fast path, one
expiry entry per session re-pushed when found early). Generated runs mix batches of lines with idle
cuts, commits and restarts (snapshot, restore, replay from the commit), with many equal deadlines so
the (deadline, generation) close order is exercised; a long run of many sessions makes the expiry
heap compact. Every line's outcome, the snapshot and the other observable state after each step,
the cut's and the flushed windows must be the same.
"""

from __future__ import annotations

import heapq
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.records import LogLine, Window
from logstream.windows import AddResult, EventTimeBound, SessionWindower, _bound_state, _Session


class ReferenceWindower(SessionWindower):
    """The per-line semantics as first written: `_join`, `_schedule` and `_expire` of before the fast path."""

    def _join(self, line: LogLine, before: tuple[float, float | None, int] | None, clamped: bool) -> AddResult | None:
        open_, gap = self._open, self.gap
        now = line.event_time
        closed: list[Window] = []
        if now > self._stream_time:
            self._stream_time = now
            if self._expiry and self._expiry[0][0] < now:
                self._expire(closed)
        late: list[str] = []
        joined = opened = 0
        bound_before: list[Any] | None = None
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
                session = open_[key] = _Session(self._generation, bound_before)
                opened += 1
            session.lines.append(line)
            joined += 1
            if now > session.last_event:
                session.last_event = now
                self._schedule(key, session)
            if len(session.lines) >= self.max_lines:
                closed.append(self._close(key, "max_size"))
        if closed or opened or clamped or late or not joined:
            return AddResult(closed, tuple(late), joined, opened, clamped=clamped)
        return None

    def _schedule(self, key: str, session: _Session) -> None:
        heapq.heappush(self._expiry, (session.last_event + self.gap + self.grace, session.generation, key))
        if len(self._expiry) > 4 * len(self._open) + 1024:
            self._expiry = [
                (s.last_event + self.gap + self.grace, s.generation, k) for k, s in self._open.items()
            ]
            heapq.heapify(self._expiry)

    def _expire(self, closed: list[Window]) -> None:
        while self._expiry and self._expiry[0][0] < self._stream_time:
            deadline, generation, key = heapq.heappop(self._expiry)
            session = self._open.get(key)
            if session is None or session.generation != generation:
                continue
            if session.last_event + self.gap + self.grace != deadline:
                continue
            closed.append(self._close(key, "gap"))


def summary(window: Window) -> tuple[Any, ...]:
    return (window.window_id, window.key, window.close_reason, [(ln.offset, ln.event_time) for ln in window.lines])


def outcome(result: AddResult) -> tuple[Any, ...]:
    return ([summary(w) for w in result.closed], result.late_keys, result.joined, result.opened, result.future,
            result.clamped, result.cut)


OPENED_ONLY = ([], (), 1, 1, False, False, 0)  # the outcome of a line listed in `SessionBatch.opened_at`


def observed(windower: SessionWindower) -> tuple[Any, ...]:
    """What the engine shows, and its event-time bound's state (a later snapshot and later decisions read it)."""
    return (windower.snapshot(), windower.stream_time, windower.oldest_open_offset(), windower.open_windows,
            windower.last_offset, windower.restoring, windower.bound.state() if windower.bound else None)


class Pair:
    """The reference and the engine under test, given the same calls; `check` compares what they show."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.reference, self.engine = self._make(ReferenceWindower), self._make(SessionWindower)

    def _make(self, kind: type[SessionWindower]) -> SessionWindower:
        bound = self.options["bound"]
        return kind("t", 0, self.options["gap"], self.options["grace"], self.options["max_lines"],
                    self.options["max_open"], EventTimeBound(*bound) if bound else None)

    def feed(self, lines: list[LogLine], times: list[float | None]) -> None:
        expected = [outcome(self.reference.add(ln, t)) for ln, t in zip(lines, times)]
        got: list[tuple[Any, ...] | None] = [None] * len(lines)
        added = self.engine.add_batch(lines, times)
        for index, result in added.events:
            got[index] = outcome(result)
        index_of = {line.offset: index for index, line in enumerate(lines)}
        for offset in added.opened_at:
            assert got[index_of[offset]] is None  # listed once
            got[index_of[offset]] = OPENED_ONLY
        for ref, new in zip(expected, got):
            if new is None:  # listed nothing: joined its windows and did nothing else
                closed, late, joined, opened, future, clamped, cut = ref
                assert not closed and not late and joined > 0 and not opened and not future and not clamped
                assert not cut
            else:
                assert new == ref
            if ref == OPENED_ONLY:  # opened one window and did nothing else: in `opened_at`, not an event
                assert new == OPENED_ONLY
        self.check()

    def cut(self) -> None:
        assert [summary(w) for w in self.engine.cut()] == [summary(w) for w in self.reference.cut()]
        self.check()

    def commit(self, offset: int) -> None:
        self.reference.forget_before(offset)
        self.engine.forget_before(offset)
        self.check()

    def restart(self, fence: int) -> int:
        """New engines restored from the snapshot, as a new owner of the partition; returns the offset
        the replay starts from (the oldest open session's first, or the fence)."""
        snapshot = self.reference.snapshot()
        assert self.engine.snapshot() == snapshot
        self.reference, self.engine = self._make(ReferenceWindower), self._make(SessionWindower)
        if snapshot is None:
            return fence
        self.reference.restore(snapshot, fence)
        self.engine.restore(snapshot, fence)
        self.check()
        return min((int(first) for _, first in snapshot.get("open", [])), default=fence)

    def check(self) -> None:
        assert observed(self.engine) == observed(self.reference)

    def finish(self) -> None:
        assert [summary(w) for w in self.engine.flush()] == [summary(w) for w in self.reference.flush()]
        self.check()


WRONG_CLOCK = 1000.0  # a step that puts one line this far ahead, the next back in step


def stream(steps: list[tuple[float, list[str], float]]) -> tuple[list[LogLine], list[float | None]]:
    """Lines at even offsets; event times from the steps (whole seconds mostly: many equal deadlines)."""
    lines, times = [], []
    event, record = 1000.0, 1_700_000_000.0
    for index, (step, blocks, record_step) in enumerate(steps):
        event += 0.0 if step == WRONG_CLOCK else step
        record += record_step
        lines.append(LogLine("t", 0, index * 2, f"raw {index}", "msg <*>", event + (step == WRONG_CLOCK) * step, None,
                             tuple(dict.fromkeys(blocks))))
        times.append(None if index % 9 == 4 else (0.0 if index % 11 == 6 else record))
    return lines, times


def run(options: dict[str, Any], steps: list[tuple[float, list[str], float]], ops: list[tuple[str, int]]) -> None:
    """Feed the stream in batches, with cuts, commits and restarts between them, as `ops` say."""
    lines, times = stream(steps)
    pair = Pair(options)
    position = 0  # index of the next line to read
    for op, n in ops:
        if position >= len(lines):
            break
        if op == "lines":
            end = min(position + n, len(lines))
            pair.feed(lines[position:end], times[position:end])
            position = end
        elif op == "cut":
            pair.cut()
        elif op == "commit":  # what the pipeline commits: the oldest open session's first offset, else the position
            oldest = pair.reference.oldest_open_offset()
            pair.commit(lines[position].offset if oldest is None else oldest)
        else:  # restart at the position: replay from the commit the snapshot implies
            start = pair.restart(lines[position].offset)
            position = next(i for i, ln in enumerate(lines) if ln.offset >= start)
    pair.finish()


# steps just past a gap but within its grace (2.5, 5.5, 31.0) tell a gap close from a join
STEP = st.one_of(st.sampled_from([0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.5, -1.0, -3.0, 5.0, 5.5, 9.0, 31.0, 60.0, 500.0,
                                  WRONG_CLOCK]),
                 st.floats(-3, 4, allow_nan=False).map(lambda x: round(x, 1)))
LINE = st.tuples(STEP, st.lists(st.sampled_from(["blk_1", "blk_2", "blk_3", "blk_4", "blk_5", "blk_6"]), max_size=3),
                 st.sampled_from([0.0, 1.0, 1.0, 5.0, 500.0]))
OPTIONS = st.fixed_dictionaries({
    "gap": st.sampled_from([2.0, 5.0, 30.0]),
    "grace": st.sampled_from([0.0, 1.5]),
    "max_lines": st.integers(1, 8),
    "max_open": st.integers(1, 5),
    "bound": st.one_of(st.none(), st.tuples(st.sampled_from([5.0, 40.0]), st.sampled_from(["dead-letter", "clamp"]),
                                            st.integers(2, 3))),
})
OPS = st.lists(st.one_of(st.tuples(st.just("lines"), st.integers(1, 25)),
                         st.tuples(st.sampled_from(["cut", "commit", "restart"]), st.just(0))), max_size=12)


@settings(max_examples=2500, deadline=None)
@given(OPTIONS, st.lists(LINE, min_size=1, max_size=80), OPS)
def test_engine_matches_the_reference(options: dict[str, Any], steps: list[tuple[float, list[str], float]],
                                      ops: list[tuple[str, int]]) -> None:
    run(options, steps, [*ops, ("lines", len(steps))])


def test_long_runs_match_the_reference() -> None:
    """Seeded runs of thousands of lines over many blocks: sessions closed by size far faster than stream
    time moves leave the expiry heap mostly closed sessions' entries, so it compacts."""
    for seed in range(12):
        rng = random.Random(seed)
        keys = [f"blk_{k}" for k in range(rng.choice([40, 300]))]
        clock = [0.0] * 400 + [1.0, -1.0] if seed % 2 else [0.0] * 12 + [1.0, 1.0, 3.0, -2.0, 40.0]  # odd: slow
        steps = [(rng.choice(clock), rng.sample(keys, rng.choice([1, 1, 1, 2])), 1.0) for _ in range(3000)]
        options = {"gap": rng.choice([5.0, 30.0]), "grace": rng.choice([0.0, 2.0]),
                   "max_lines": 1 if seed % 2 else rng.choice([2, 5]),  # odd seeds: a session per line
                   "max_open": rng.choice([20, 250]), "bound": rng.choice([None, (60.0, "clamp", 2)])}
        ops = [rng.choice([("lines", rng.randint(1, 700)), ("lines", 300), ("cut", 0), ("commit", 0), ("restart", 0)])
               for _ in range(0 if seed % 4 == 1 else 20)]  # some runs neither cut nor restart: the heap grows
        run(options, steps, [*ops, ("lines", len(steps))])


def test_a_joining_line_ends_a_run_of_lines_ahead() -> None:
    """A line the bound refuses starts a run; the next line, joining its open session on the fast path,
    ends it (the bound's state after the batch is the reference's)."""
    options = {"gap": 30.0, "grace": 0.0, "max_lines": 8, "max_open": 5, "bound": (40.0, "dead-letter", 2)}
    steps: list[tuple[float, list[str], float]] = [(0.0, ["blk_1"], 1.0), (0.0, ["blk_1"], 1.0),
                                                   (WRONG_CLOCK, ["blk_1"], 1.0), (0.0, ["blk_1"], 1.0)]
    run(options, steps, [("lines", 4)])


def test_a_session_opened_after_a_refused_line_keeps_the_run_in_its_snapshot() -> None:
    """A line the bound refuses starts a run; the next line opens a session on the fast path. The bound's state
    before that line (the run included) is where a replay of the session starts: the snapshot shows it."""
    options = {"gap": 30.0, "grace": 0.0, "max_lines": 2, "max_open": 5, "bound": (40.0, "dead-letter", 2)}
    steps: list[tuple[float, list[str], float]] = [(0.0, ["blk_1"], 1.0), (0.0, ["blk_1"], 1.0),  # closed: max_size
                                                   (WRONG_CLOCK, ["blk_1"], 1.0), (0.0, ["blk_2"], 1.0)]
    run(options, steps, [("lines", 4)])


def test_a_line_within_the_grace_opens_its_session() -> None:
    """A line of a block with no open session, behind stream time by more than the gap but less than gap and
    grace, is not late: it opens a session (on the fast path) as the reference does."""
    options = {"gap": 5.0, "grace": 1.5, "max_lines": 8, "max_open": 5, "bound": None}
    steps: list[tuple[float, list[str], float]] = [(0.0, ["blk_1"], 1.0), (6.0, ["blk_1"], 1.0),  # a gap close
                                                   (-6.0, ["blk_2"], 1.0), (0.0, ["blk_2"], 1.0)]
    run(options, steps, [("lines", 4)])


def test_a_line_past_the_gap_but_within_the_grace_closes_its_session() -> None:
    """The line moves stream time past its session's (early) expiry entry, but not past the session's
    deadline: the expiry closes nothing, and the line, past the gap, closes the session (gap) and opens the
    next, as the reference does; the session is not taken as expired."""
    options = {"gap": 5.0, "grace": 1.5, "max_lines": 8, "max_open": 5, "bound": None}
    steps: list[tuple[float, list[str], float]] = [(0.0, ["blk_1"], 1.0), (1.0, ["blk_1"], 1.0),
                                                   (6.0, ["blk_1"], 1.0), (0.0, ["blk_1"], 1.0)]
    run(options, steps, [("lines", 4)])
