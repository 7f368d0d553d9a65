"""Window boundaries and replay determinism of the count and session engines."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.records import LogLine, Window
from logstream.windows import CountWindower, SessionWindower, make_windower


def line(offset: int, t: float = 0.0, blocks: tuple[str, ...] = (), template: str = "msg <*>") -> LogLine:
    return LogLine("t", 0, offset, f"raw {offset}", template, t, None, blocks)


def feed(windower: CountWindower | SessionWindower, lines: list[LogLine]) -> list[Window]:
    out: list[Window] = []
    for item in lines:
        out.extend(windower.add(item).closed)
    return out


# --- count windows ------------------------------------------------------------------------------


@given(n=st.integers(0, 450), size=st.integers(1, 120))
def test_non_overlapping_count_windows_cover_every_line_once(n: int, size: int) -> None:
    windower = CountWindower("t", 0, size)
    windows = feed(windower, [line(i) for i in range(n)]) + windower.flush()
    assert len(windows) == math.ceil(n / size)
    assert [ln.offset for w in windows for ln in w.lines] == list(range(n))
    assert all(w.size == size for w in windows[:-1])
    assert windower.open_windows == 0


@given(n=st.integers(0, 300), size=st.integers(1, 40), data=st.data())
def test_sliding_count_windows(n: int, size: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, size))
    windower = CountWindower("t", 0, size, stride)
    closed = feed(windower, [line(i) for i in range(n)])
    starts = [w.first_offset for w in closed]
    assert starts == list(range(0, n - size + 1, stride))[: len(closed)]
    assert all(w.size == size and w.last_offset == w.first_offset + size - 1 for w in closed)
    tail = windower.flush()
    assert all(w.close_reason == "end_of_input" and w.last_offset == n - 1 for w in tail)


def test_count_window_offsets_follow_records_not_arithmetic() -> None:
    # offsets with gaps (transaction markers, dead-lettered records) still give windows of N lines
    windower = CountWindower("t", 0, 3)
    windows = feed(windower, [line(o) for o in (0, 2, 3, 7, 8, 9, 15)]) + windower.flush()
    assert [(w.first_offset, w.last_offset, w.size) for w in windows] == [(0, 3, 3), (7, 9, 3), (15, 15, 1)]


def test_stride_larger_than_size_is_refused() -> None:
    with pytest.raises(ValueError):
        CountWindower("t", 0, 10, 11)
    with pytest.raises(ValueError):
        make_windower("tumbling", "t", 0)


# --- session windows ----------------------------------------------------------------------------


def test_sessions_group_by_block_and_multi_block_lines_join_each() -> None:
    windower = SessionWindower("t", 0, gap=1e9)
    lines = [line(0, 0, ("a",)), line(1, 1, ("b",)), line(2, 2, ("a", "b")), line(3, 3, ("c",))]
    windows = feed(windower, lines) + windower.flush()
    by_key = {w.key: [ln.offset for ln in w.lines] for w in windows}
    assert by_key == {"a": [0, 2], "b": [1, 2], "c": [3]}


def test_session_closes_on_gap_in_event_time_with_grace() -> None:
    windower = SessionWindower("t", 0, gap=10, grace=5)
    assert feed(windower, [line(0, 100, ("a",)), line(1, 105, ("b",))]) == []
    # stream time 114 is within gap + grace of a's last line (100): still open
    assert feed(windower, [line(2, 114, ("b",))]) == []
    closed = feed(windower, [line(3, 116, ("b",))])  # 116 > 100 + 10 + 5
    assert [(w.key, w.close_reason) for w in closed] == [("a", "gap")]
    # a new line of b more than `gap` after b's last line starts a new session
    closed = feed(windower, [line(4, 127, ("b",))])
    assert [(w.key, w.close_reason, w.size) for w in closed] == [("b", "gap", 3)]


def test_out_of_order_line_within_grace_joins_and_late_line_is_reported() -> None:
    windower = SessionWindower("t", 0, gap=10, grace=5)
    feed(windower, [line(0, 100, ("a",)), line(1, 103, ("b",))])
    result = windower.add(line(2, 98, ("a",)))  # older than a's last line, a still open: joins
    assert result.joined == 1 and not result.late_keys
    closed = feed(windower, [line(3, 200, ("c",))])
    assert {w.key for w in closed} == {"a", "b"}
    late = windower.add(line(4, 101, ("a",)))  # a closed; 101 + 15 < 200
    assert late.joined == 0 and late.late_keys == ("a",)


def test_session_max_lines_and_open_cap() -> None:
    windower = SessionWindower("t", 0, gap=1e9, max_lines=2, max_open=2)
    closed = feed(windower, [line(0, 0, ("a",)), line(1, 0, ("a",))])
    assert [(w.key, w.close_reason, w.size) for w in closed] == [("a", "max_size", 2)]
    closed = feed(windower, [line(2, 0, ("x",)), line(3, 0, ("y",)), line(4, 0, ("z",))])
    assert [(w.key, w.close_reason) for w in closed] == [("x", "cap")]  # oldest opened closes first
    assert windower.open_windows == 2


def test_unkeyed_line_joins_nothing() -> None:
    windower = SessionWindower("t", 0)
    result = windower.add(line(0, 0, ()))
    assert result.joined == 0 and result.late_keys == ()


# --- replay determinism --------------------------------------------------------------------------

session_lines = st.lists(
    st.tuples(
        st.floats(0, 40, allow_nan=False),  # event-time step (may be negative below)
        st.booleans(),  # out of order?
        st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), min_size=0, max_size=3),
    ),
    min_size=1,
    max_size=120,
)


def build(spec: list[tuple[float, bool, list[str]]]) -> list[LogLine]:
    t, out, offset = 1000.0, [], 0
    for step, backwards, blocks in spec:
        t += step
        offset += 1 + (step > 30)  # offset gaps, as transaction markers leave
        out.append(line(offset, t - 25 if backwards else t, tuple(dict.fromkeys(blocks))))
    return out


def ids(windows: list[Window]) -> list[tuple[str, str, int, int]]:
    return [(w.window_id, w.key, w.first_offset, w.last_offset) for w in windows]


@settings(max_examples=300, deadline=None)
@given(spec=session_lines, data=st.data())
def test_session_replay_from_a_cut_rebuilds_the_same_windows(spec: list, data: st.DataObject) -> None:
    lines = build(spec)
    kwargs = {"gap": 20.0, "grace": 5.0, "max_lines": 7, "max_open": 3}
    reference = SessionWindower("t", 0, **kwargs)
    ref_windows = feed(reference, lines) + reference.flush()

    cut_at = data.draw(st.integers(0, len(lines)))
    first = SessionWindower("t", 0, **kwargs)
    emitted = feed(first, lines[:cut_at])
    fence = lines[cut_at].offset if cut_at < len(lines) else lines[-1].offset + 1
    commit = first.oldest_open_offset()
    commit = fence if commit is None else commit
    snapshot = first.snapshot()

    # a restart: replay from the committed offset with the snapshot and the fence
    second = SessionWindower("t", 0, **kwargs)
    second.restore(snapshot, fence)
    replay = [ln for ln in lines if ln.offset >= commit]
    assert all(not second.add(ln).closed for ln in replay if ln.offset < fence)
    emitted += feed(second, [ln for ln in replay if ln.offset >= fence]) + second.flush()
    assert ids(emitted) == ids(ref_windows)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), size=st.integers(1, 15), data=st.data())
def test_count_replay_from_a_cut_rebuilds_the_same_windows(n: int, size: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, size))
    lines = [line(i * 2) for i in range(n)]
    reference = CountWindower("t", 0, size, stride)
    ref_windows = feed(reference, lines) + reference.flush()
    cut_at = data.draw(st.integers(0, n))
    first = CountWindower("t", 0, size, stride)
    emitted = feed(first, lines[:cut_at])
    fence = lines[cut_at].offset if cut_at < n else lines[-1].offset + 1
    commit = first.oldest_open_offset()
    commit = fence if commit is None else commit
    second = CountWindower("t", 0, size, stride)
    replayed = feed(second, [ln for ln in lines if commit <= ln.offset < fence])
    assert replayed == []  # nothing below the fence closes again
    emitted += feed(second, [ln for ln in lines if ln.offset >= fence]) + second.flush()
    assert ids(emitted) == ids(ref_windows)


def test_session_windows_match_a_groupby_on_real_hdfs_lines() -> None:
    from logstream.parsing import LineParser
    from tests.kafkatools import SAMPLES

    parser = LineParser("hdfs")
    lines = [parser.parse(raw, topic="t", partition=0, offset=i, record_time=0.0)
             for i, raw in enumerate((SAMPLES / "HDFS_2k.log").read_bytes().splitlines())]
    windower = SessionWindower("t", 0, gap=1e9, max_lines=10_000)
    windows = feed(windower, lines) + windower.flush()
    expected: dict[str, list[int]] = defaultdict(list)
    for item in lines:
        for block in item.block_ids:
            expected[block].append(item.offset)
    assert {w.key: [ln.offset for ln in w.lines] for w in windows} == expected
    assert len(windows) == 2200  # distinct blocks in HDFS_2k (shared/data/README.md)
