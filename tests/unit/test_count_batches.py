"""Differential: `CountWindower.add_batch` = `add` line by line (sizes, strides, cuts, replayed cuts),
the windows a replayed cut closed marked alike (`AddResult.cut`, the flag of `CountBatch.closed`)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.records import LogLine, Window
from logstream.windows import CountWindower


def lines(n: int, start: int = 0) -> list[LogLine]:
    return [LogLine(topic="t", partition=1, offset=start + i, raw=f"l{i}", template="l<*>", event_time=float(i))
            for i in range(n)]


def shape(window: Window) -> tuple[str, str, list[int]]:
    return window.window_id, window.close_reason, [line.offset for line in window.lines]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 80), st.lists(st.integers(1, 30), min_size=1),
       st.sets(st.integers(0, 79), max_size=6), st.sets(st.integers(0, 79), max_size=3))
def test_batches_cut_the_windows_add_cuts(size: int, stride: int, n: int, sizes: list[int], replayed_cuts: set[int],
                                          live_cuts: set[int]) -> None:
    stride = min(stride, size)
    one, many = CountWindower("t", 1, size, stride), CountWindower("t", 1, size, stride)
    for windower in (one, many):  # cuts recorded before a restart, met again while replaying
        windower.restore({"cuts": sorted(replayed_cuts)}, fence=0)
    feed = lines(n)
    expected: list[tuple[int, tuple[str, str, list[int]], bool]] = []
    opened: list[int] = []
    got: list[tuple[int, tuple[str, str, list[int]], bool]] = []
    got_opened: list[int] = []
    start, turn = 0, 0
    while start < n:
        chunk = feed[start:start + sizes[turn % len(sizes)]]
        for line in chunk:
            result = one.add(line)
            assert result.joined >= 1
            opened += [line.offset] * result.opened
            assert result.cut == 0 or line.offset in replayed_cuts
            first_cut = len(result.closed) - result.cut  # the last `cut` windows are the replayed cut's
            expected += [(line.offset, shape(w), i >= first_cut) for i, w in enumerate(result.closed)]
        batch = many.add_batch(chunk)
        got += [(offset, shape(w), cut) for offset, w, cut in batch.closed]
        got_opened += batch.opened_at
        if chunk[-1].offset in live_cuts:  # an idle cut between two consume batches
            expected += [(-1, shape(w), False) for w in one.cut()]
            got += [(-1, shape(w), False) for w in many.cut()]
        start, turn = start + len(chunk), turn + 1
        assert (one.open_windows, one.last_offset, one.oldest_open_offset(), one.snapshot()) == (
            many.open_windows, many.last_offset, many.oldest_open_offset(), many.snapshot())
    assert got == expected and got_opened == opened
    assert all((reason == "idle") == cut for offset, (_, reason, _), cut in got if offset in replayed_cuts)
    assert [shape(w) for w in many.flush()] == [shape(w) for w in one.flush()]


def test_an_empty_batch_does_nothing() -> None:
    windower = CountWindower("t", 0, 3)
    batch = windower.add_batch([])
    assert batch.closed == [] and batch.opened_at == [] and windower.open_windows == 0
