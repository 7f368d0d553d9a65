"""Differential: `SessionWindower.add_batch` = `add` on each line in turn.

Generated streams (block ids from a small pool, one to three per line or none, event times that
step, go back, jump ahead and far ahead, record times with gaps) through engines with and without
the event-time bound (dead-letter and clamp), small caps on lines and open sessions, and a restart
in the middle (snapshot, restore, replay below the fence): every line's outcome (windows closed
with their ids, keys, close reasons and lines; sessions opened; late keys; joined none; refused;
clamped), then the snapshot, the stream time, the oldest open offset and the flushed windows.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.records import LogLine, Window
from logstream.windows import AddResult, EventTimeBound, SessionWindower


def summary(window: Window) -> tuple[Any, ...]:
    return (window.window_id, window.key, window.close_reason, [(ln.offset, ln.event_time) for ln in window.lines])


def outcome(result: AddResult) -> tuple[Any, ...]:
    return ([summary(w) for w in result.closed], result.late_keys, result.joined, result.opened, result.future,
            result.clamped, result.cut)


def engine(options: dict[str, Any]) -> SessionWindower:
    bound = options["bound"]
    return SessionWindower("t", 0, options["gap"], options["grace"], options["max_lines"], options["max_open"],
                           EventTimeBound(*bound) if bound else None)


def one_by_one(windower: SessionWindower, lines: list[LogLine], times: list[float | None]) -> list[tuple[Any, ...]]:
    return [outcome(windower.add(ln, t)) for ln, t in zip(lines, times)]


def batched(windower: SessionWindower, lines: list[LogLine], times: list[float | None],
            sizes: list[int]) -> list[tuple[Any, ...] | None]:
    """Outcomes per line; None where `add_batch` listed no event (the line joined and did nothing else)."""
    out: list[tuple[Any, ...] | None] = []
    start, turn = 0, 0
    while start < len(lines):
        end = start + sizes[turn % len(sizes)]
        turn += 1
        chunk: list[tuple[Any, ...] | None] = [None] * len(lines[start:end])
        added = windower.add_batch(lines[start:end], times[start:end])
        for index, result in added.events:
            chunk[index] = outcome(result)
        index_of = {line.offset: index for index, line in enumerate(lines[start:end])}
        for offset in added.opened_at:
            assert chunk[index_of[offset]] is None  # listed once
            chunk[index_of[offset]] = OPENED_ONLY
        out += chunk
        start = end
    return out


OPENED_ONLY = ([], (), 1, 1, False, False, 0)  # the outcome of a line listed in `SessionBatch.opened_at`


def agree(reference: list[tuple[Any, ...]], batch: list[tuple[Any, ...] | None]) -> None:
    assert len(reference) == len(batch)
    for ref, got in zip(reference, batch):
        if got is None:  # listed nothing: joined some windows, closed and opened none, no note
            closed, late, joined, opened, future, clamped, cut = ref
            assert not closed and not late and joined > 0 and not opened and not future and not clamped and not cut
        else:
            assert got == ref
        if ref == OPENED_ONLY:  # opened one window and did nothing else: listed in `opened_at`, not as an event
            assert got == OPENED_ONLY


def state(windower: SessionWindower) -> tuple[Any, ...]:
    return (windower.snapshot(), windower.stream_time, windower.oldest_open_offset(), windower.open_windows,
            windower.last_offset)


STEP = st.one_of(st.floats(-3, 4, allow_nan=False).map(lambda x: round(x, 1)), st.sampled_from([0.0, 0.0, 9.0, 60.0]))
LINE = st.tuples(STEP, st.lists(st.sampled_from(["blk_1", "blk_2", "blk_3", "blk_4", "blk_5", "blk_6"]), max_size=3),
                 st.sampled_from([0.0, 1.0, 1.0, 5.0, 500.0]))
OPTIONS = st.fixed_dictionaries({
    "gap": st.sampled_from([2.0, 5.0, 30.0]),
    "grace": st.sampled_from([0.0, 1.5]),
    "max_lines": st.integers(2, 8),
    "max_open": st.integers(1, 5),
    "bound": st.one_of(st.none(), st.tuples(st.sampled_from([5.0, 40.0]), st.sampled_from(["dead-letter", "clamp"]),
                                            st.integers(2, 3))),
})


def stream(steps: list[tuple[float, list[str], float]]) -> tuple[list[LogLine], list[float | None]]:
    lines, times = [], []
    event, record = 1000.0, 1_700_000_000.0
    for offset, (step, blocks, record_step) in enumerate(steps):
        event += step
        record += record_step
        lines.append(LogLine("t", 0, offset * 2, f"raw {offset}", "msg <*>", event, None,
                             tuple(dict.fromkeys(blocks))))
        times.append(None if offset % 9 == 4 else (0.0 if offset % 11 == 6 else record))
    return lines, times


@settings(max_examples=600, deadline=None)
@given(OPTIONS, st.lists(LINE, max_size=80), st.lists(st.integers(1, 30), min_size=1, max_size=4))
def test_add_batch_gives_what_add_gives(options: dict[str, Any], steps: list[tuple[float, list[str], float]],
                                        sizes: list[int]) -> None:
    lines, times = stream(steps)
    reference, batch = engine(options), engine(options)
    agree(one_by_one(reference, lines, times), batched(batch, lines, times, sizes))
    assert state(batch) == state(reference)
    assert [summary(w) for w in batch.flush()] == [summary(w) for w in reference.flush()]


def check_restart(options: dict[str, Any], steps: list[tuple[float, list[str], float]], cut: int,
                  sizes: list[int]) -> None:
    """Run the first `cut` lines, restart from the snapshot and replay from the commit: add_batch = add."""
    lines, times = stream(steps)
    first = engine(options)
    one_by_one(first, lines[:cut], times[:cut])
    fence = lines[cut].offset if cut < len(lines) else lines[-1].offset + 1
    commit = first.oldest_open_offset()
    commit = fence if commit is None else commit
    snapshot = first.snapshot()
    replay = [i for i, ln in enumerate(lines) if ln.offset >= commit]
    replayed = [lines[i] for i in replay]
    replay_times = [times[i] for i in replay]
    reference, batch = engine(options), engine(options)
    if snapshot is not None:
        reference.restore(snapshot, fence)
        batch.restore(snapshot, fence)
    agree(one_by_one(reference, replayed, replay_times), batched(batch, replayed, replay_times, sizes))
    assert state(batch) == state(reference)
    assert [summary(w) for w in batch.flush()] == [summary(w) for w in reference.flush()]


@settings(max_examples=600, deadline=None)
@given(OPTIONS, st.lists(LINE, min_size=1, max_size=60), st.data())
def test_add_batch_replays_a_restart_as_add_does(options: dict[str, Any], steps: list[tuple[float, list[str], float]],
                                                 data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(steps)))
    check_restart(options, steps, cut, data.draw(st.lists(st.integers(1, 20), min_size=1, max_size=3)))


def test_first_line_past_the_fence_late_for_one_block() -> None:
    """Found by the test above: the line that ends a replay joins one block and is late for another."""
    options = {"gap": 2.0, "grace": 0.0, "max_lines": 3, "max_open": 1, "bound": None}
    check_restart(options, [(0.0, [], 0.0), (0.0, ["blk_1"], 0.0), (-3.0, [], 0.0), (0.0, ["blk_1", "blk_2"], 0.0)],
                  3, [1])


def _line(offset: int, event_time: float, *blocks: str) -> LogLine:
    return LogLine("t", 0, offset, f"raw {offset}", "msg <*>", event_time, None, blocks)


def test_a_restart_under_a_lower_max_open_closes_for_the_cap_as_add_does() -> None:
    """An operator lowers --session-max-open and restarts: the rebuilt engine holds more sessions than the
    cap. A line whose block's session expires and reopens then also closes the oldest one for the cap
    (`_join`), in `add_batch` as in `add`."""
    first = SessionWindower("t", 0, 5.0, 0.0, 10, 3)
    for line in [_line(0, 0.0, "a"), _line(1, 1.0, "b"), _line(2, 2.0, "c")]:
        first.add(line)
    snapshot = first.snapshot()
    lines = [_line(0, 0.0, "a"), _line(1, 1.0, "b"), _line(2, 2.0, "c"), _line(3, 2.0, "c"), _line(4, 6.0, "a")]
    engines = []
    for _ in range(2):
        engine = SessionWindower("t", 0, 5.0, 0.0, 10, 2)
        engine.restore(snapshot, 3)
        engines.append(engine)
    one, many = engines
    reference = one_by_one(one, lines, [None] * len(lines))
    assert [(key, reason) for _, key, reason, _ in reference[-1][0]] == [("a", "gap"), ("b", "cap")]
    agree(reference, batched(many, lines, [None] * len(lines), [len(lines)]))
    assert state(many) == state(one) and many.open_windows == 2


def test_lines_before_the_bound_has_a_time_take_the_per_line_steps() -> None:
    """Until the event-time bound has a stream time, no line takes the fast path: a line stamped -inf opens
    its session with the bound's state as a snapshot gives it (no time: None), as `add` does."""
    lines = [_line(0, float("-inf"), "a"), _line(1, float("-inf"), "b"), _line(2, 5.0, "c"), _line(3, 5.0, "d")]
    one, many = (SessionWindower("t", 0, 5.0, 0.0, 10, 5, EventTimeBound(10.0)) for _ in range(2))
    for part in (lines[:2], lines[2:]):
        agree(one_by_one(one, part, [None] * len(part)), batched(many, part, [None] * len(part), [len(part)]))
        assert state(many) == state(one)
        if part[0].offset == 0:  # the second line's session is the newest: its replay would start from its state
            assert many._open["b"].bound_before == one._open["b"].bound_before == [None, None, 0]
