"""Window boundaries and replay determinism of the count and session engines."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.records import LogLine, Window
from logstream.windows import CountWindower, EventTimeBound, SessionWindower, make_windower


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


def test_a_session_cut_closes_every_open_session_and_is_kept_until_committed() -> None:
    windower = SessionWindower("t", 0, gap=300.0)
    feed(windower, [line(0, 10.0, ("blk_1",)), line(1, 11.0, ("blk_2",)), line(2, 12.0, ("blk_1",))])
    before = windower.snapshot()
    held = windower.cut()
    assert [(w.key, w.first_offset, w.last_offset, w.close_reason) for w in held] == [
        ("blk_1", 0, 2, "idle"), ("blk_2", 1, 1, "idle")]
    assert windower.open_windows == 0 and windower.cut() == []
    assert windower.snapshot() == {**before, "cuts": [2]}, "until committed: the state a replay needs"
    windower.forget_before(0)
    assert windower.snapshot() == {**before, "cuts": [2]}
    feed(windower, [line(3, 13.0, ("blk_1",))])  # after the cut: a new session
    windower.forget_before(3)  # a commit past the cut
    assert "cuts" not in (windower.snapshot() or {}) and windower.oldest_open_offset() == 3


@settings(max_examples=300, deadline=None)
@given(spec=session_lines, data=st.data())
def test_a_restart_before_the_session_cut_is_committed_publishes_the_same_windows(spec: list,
                                                                                  data: st.DataObject) -> None:
    """As the pipeline commits a cut (offset at the oldest held window, fence at the cut's line) and a
    restart replays from there: the line of the cut closes the same sessions, with the same ids."""
    lines = build(spec)
    kwargs = {"gap": 20.0, "grace": 5.0, "max_lines": 7, "max_open": 3}
    cut_after = data.draw(st.integers(1, len(lines)))
    reference = SessionWindower("t", 0, **kwargs)
    emitted = feed(reference, lines[:cut_after])
    held = reference.cut()
    ref_windows = emitted + held + feed(reference, lines[cut_after:]) + reference.flush()
    if not held:
        return
    first = SessionWindower("t", 0, **kwargs)
    feed(first, lines[:cut_after])
    fence = lines[cut_after - 1].offset + 1  # the position at the cut: all of it replayed
    commit = held[0].first_offset
    assert ids(first.cut()) == ids(held)
    first.forget_before(commit)
    snapshot = first.snapshot()

    second = SessionWindower("t", 0, **kwargs)
    second.restore(snapshot, fence)
    replay = [ln for ln in lines if ln.offset >= commit]
    results = [second.add(ln) for ln in replay if ln.offset < fence]
    assert [r.closed for r in results if r.closed] == [r.closed for r in results if r.cut]  # only the cut's
    again = [w for r in results for w in r.closed] + feed(second, [ln for ln in replay if ln.offset >= fence])
    assert ids(emitted + again + second.flush()) == ids(ref_windows)


def test_a_second_cut_keeps_the_state_just_before_it() -> None:
    """Quiet, a few lines, quiet again before any commit passed the first cut: the second cut's replay
    state is the one just before it (the first cut's state would lose the sessions opened between)."""
    windower = SessionWindower("t", 0, gap=300.0)
    feed(windower, [line(0, 10.0, ("A",)), line(1, 11.0, ("B",))])
    windower.cut()
    feed(windower, [line(2, 12.0, ("C",)), line(3, 13.0, ("A",))])
    state = windower._state()  # the state just before the second cut
    held = windower.cut()
    assert [(w.key, w.first_offset) for w in held] == [("C", 2), ("A", 3)]
    assert windower.snapshot() == {**state, "cuts": [3]} and state["open"] == [["C", 2], ["A", 3]]


def test_a_cut_after_a_replay_that_read_everything_closes_the_restored_sessions() -> None:
    """A restart with nothing new to read: the replay reaches the end below the fence and the partition
    goes quiet; the cut ends the replay and closes the sessions it rebuilt."""
    lines = [line(0, 10.0, ("A",)), line(1, 11.0, ("B",)), line(2, 12.0, ("A",))]
    first = SessionWindower("t", 0, gap=300.0)
    feed(first, lines)
    second = SessionWindower("t", 0, gap=300.0)
    second.restore(first.snapshot(), fence=3)
    assert feed(second, lines) == [] and second.restoring
    held = second.cut()
    assert [(w.key, w.first_offset, w.last_offset, w.close_reason) for w in held] == [
        ("A", 0, 2, "idle"), ("B", 1, 1, "idle")]


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


# --- event-time bound (a line from a clock far ahead) -------------------------------------------------


def bounded(policy: str = "dead-letter", **kwargs: float) -> SessionWindower:
    return SessionWindower("t", 0, gap=10, grace=5, bound=EventTimeBound(3600, policy, 3), **kwargs)


def test_a_line_far_ahead_is_refused_and_does_not_move_stream_time() -> None:
    windower = bounded()
    feed(windower, [line(0, 100, ("a",)), line(1, 101, ("b",))])
    far = windower.add(line(2, 100 + 2 * 86_400, ("c",)))
    assert far.future and far.joined == 0 and windower.stream_time == 101
    after = windower.add(line(3, 102, ("a",)))
    assert not after.future and after.joined == 1 and not after.late_keys
    windows = windower.flush()
    assert {w.key: [ln.offset for ln in w.lines] for w in windows} == {"a": [0, 3], "b": [1]}


def test_clamp_policy_joins_the_line_at_the_stream_time() -> None:
    windower = bounded("clamp")
    feed(windower, [line(0, 100, ("a",))])
    result = windower.add(line(1, 100 + 2 * 86_400, ("b",)))
    assert result.clamped and not result.future and result.joined == 1
    assert windower.stream_time == 100
    (b,) = [w for w in windower.flush() if w.key == "b"]
    assert b.lines[0].event_time == 100 and b.lines[0].offset == 1


def test_record_time_moves_the_reference_so_a_quiet_partition_accepts_later_lines() -> None:
    bound = EventTimeBound(3600, "dead-letter", 3)
    assert bound.admit(1_000.0, record_time=1_000.0) == 1_000.0
    # two days of silence, then the next line: written two days later too
    assert bound.admit(1_000.0 + 2 * 86_400, record_time=1_000.0 + 2 * 86_400) is not None
    # a backfill (records written within a second) with a line two days ahead: refused
    backfill = EventTimeBound(3600, "dead-letter", 3)
    backfill.admit(1_000.0, record_time=5e9)
    assert backfill.admit(1_000.0 + 2 * 86_400, record_time=5e9 + 0.1) is None


def test_consecutive_lines_past_the_bound_are_a_genuine_jump() -> None:
    bound = EventTimeBound(3600, "dead-letter", 3)
    bound.admit(0.0)
    assert bound.admit(86_400.0) is None and bound.admit(86_401.0) is None
    assert bound.admit(86_402.0) == 86_402.0  # the third in a row: the stream jumped (a gap in a sampled dump)
    assert bound.stream_time == 86_402.0 and bound.admit(86_403.0) == 86_403.0
    # a single wrong clock between correct lines never builds a run
    for t in (86_404.0, 900_000.0, 86_405.0, 900_001.0, 86_406.0):
        admitted = bound.admit(t)
        assert (admitted is None) == (t > 800_000)


def test_the_issue_input_seven_hdfs_lines_one_from_two_days_ahead() -> None:
    from logstream.parsing import LineParser
    from tests.hardening_inputs import CLOCK_AHEAD_HDFS

    parser = LineParser("hdfs")
    lines = [parser.parse(text.encode(), topic="t", partition=0, offset=i, record_time=0.0)
             for i, text in enumerate(CLOCK_AHEAD_HDFS)]
    windower = make_windower("session", "t", 0, gap=300, grace=30, max_future=3600)
    results = [windower.add(item, record_time=1e9) for item in lines]
    assert [r.future for r in results] == [False, False, False, True, False, False, False]
    assert not any(r.late_keys for r in results)
    windows = windower.flush()
    assert {w.key: [ln.offset for ln in w.lines] for w in windows} == {
        "blk_38865049064139660": [0, 4], "blk_-6952295868487656571": [1, 2, 6], "blk_7128370237687728475": [5]}


@settings(max_examples=200, deadline=None)
@given(spec=session_lines, data=st.data())
def test_bounded_session_replay_from_a_cut_rebuilds_the_same_windows(spec: list, data: st.DataObject) -> None:
    lines = build(spec)
    # some lines come from a clock far ahead: alone, in pairs, or in runs that confirm a jump
    jumps = data.draw(st.lists(st.integers(0, len(lines) - 1), max_size=6))
    for index in jumps:
        lines[index] = lines[index]._replace(event_time=lines[index].event_time + 10_000)
    policy = data.draw(st.sampled_from(["dead-letter", "clamp"]))
    confirm = data.draw(st.integers(2, 3))

    def make() -> SessionWindower:
        return SessionWindower("t", 0, gap=20.0, grace=5.0, max_lines=7, max_open=3,
                               bound=EventTimeBound(100.0, policy, confirm))

    reference = make()
    ref_windows = feed(reference, lines) + reference.flush()
    cut_at = data.draw(st.integers(0, len(lines)))
    first = make()
    emitted = feed(first, lines[:cut_at])
    fence = lines[cut_at].offset if cut_at < len(lines) else lines[-1].offset + 1
    commit = first.oldest_open_offset()
    commit = fence if commit is None else commit
    second = make()
    second.restore(first.snapshot(), fence)
    replay = [ln for ln in lines if ln.offset >= commit]
    assert all(not second.add(ln).closed for ln in replay if ln.offset < fence)
    emitted += feed(second, [ln for ln in replay if ln.offset >= fence]) + second.flush()
    assert ids(emitted) == ids(ref_windows)
    assert [[ln.event_time for ln in w.lines] for w in emitted] == [[ln.event_time for ln in w.lines]
                                                                    for w in ref_windows]


# --- idle cuts of count windows -------------------------------------------------------------------


def test_a_cut_closes_the_partial_windows_and_the_next_line_starts_afresh() -> None:
    windower = CountWindower("t", 0, 50, 25)
    assert feed(windower, [line(i) for i in range(30)]) == []
    cut = windower.cut()
    assert [(w.first_offset, w.last_offset, w.close_reason) for w in cut] == [(0, 29, "idle"), (25, 29, "idle")]
    assert windower.open_windows == 0 and windower.cut() == []
    windows = feed(windower, [line(i) for i in range(30, 80)])
    assert [(w.first_offset, w.last_offset) for w in windows] == [(30, 79)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), size=st.integers(1, 15), data=st.data())
def test_count_replay_from_a_cut_rebuilds_the_same_windows(n: int, size: int, data: st.DataObject) -> None:
    """With or without idle cuts, a replay from any commit closes the same windows (none below the fence)."""
    stride = data.draw(st.integers(1, size))
    lines = [line(i * 2) for i in range(n)]  # offset gaps, as transaction markers leave
    cut_after = set(data.draw(st.lists(st.integers(0, n - 1), max_size=5)))

    def run(windower: CountWindower, items: list[LogLine]) -> list[Window]:
        out: list[Window] = []
        for item in items:
            out.extend(windower.add(item).closed)
            if item.offset // 2 in cut_after:
                out.extend(windower.cut())
        return out

    reference = CountWindower("t", 0, size, stride)
    ref_windows = run(reference, lines) + reference.flush()
    stop = data.draw(st.integers(0, n))
    first = CountWindower("t", 0, size, stride)
    emitted = run(first, lines[:stop])
    fence = lines[stop].offset if stop < n else lines[-1].offset + 1
    commit = first.oldest_open_offset()
    commit = fence if commit is None else commit
    first.forget_before(commit)
    snapshot = first.snapshot()
    second = CountWindower("t", 0, size, stride)
    if snapshot is not None:
        second.restore(snapshot, fence)
    assert feed(second, [ln for ln in lines if commit <= ln.offset < fence]) == []  # nothing closes again
    emitted += run(second, [ln for ln in lines if ln.offset >= fence]) + second.flush()
    assert ids(emitted) == ids(ref_windows)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 120), size=st.integers(1, 15), data=st.data())
def test_a_restart_before_the_count_cut_is_committed_publishes_the_same_windows(n: int, size: int,
                                                                                data: st.DataObject) -> None:
    """As the pipeline commits a count cut (offset at the oldest held window, fence at the position at
    the cut, past a record after the cut's line that was no line) and a restart replays from there: the
    cut's line, below the fence, closes the same windows with the same ids, marked as the cut's (by `add`
    and `add_batch` alike), and nothing else closes below the fence."""
    stride = data.draw(st.integers(1, size))
    cut_after = data.draw(st.integers(1, n))
    lines = [line(i * 2) for i in range(n)]  # offset gaps: records that were no line (dead-lettered)
    reference = CountWindower("t", 0, size, stride)
    emitted = feed(reference, lines[:cut_after])
    held = reference.cut()
    ref_windows = emitted + held + feed(reference, lines[cut_after:]) + reference.flush()
    if not held:
        return
    first = CountWindower("t", 0, size, stride)
    feed(first, lines[:cut_after])
    cut_line = lines[cut_after - 1].offset
    fence = cut_line + 2  # the position at the cut: the bad record after its line was read
    assert ids(first.cut()) == ids(held)
    commit = held[0].first_offset
    first.forget_before(commit)
    snapshot = first.snapshot()
    assert snapshot == {"cuts": [cut_line]}

    replay = [ln for ln in lines if commit <= ln.offset < fence]
    second, batched = CountWindower("t", 0, size, stride), CountWindower("t", 0, size, stride)
    second.restore(snapshot, fence)
    batched.restore(snapshot, fence)
    results = [second.add(ln) for ln in replay]
    assert all(len(r.closed) == r.cut for r in results), "below the fence only the cut's windows close"
    again = [w for r in results for w in r.closed]
    assert ids(again) == ids(held) and all(w.close_reason == "idle" for w in again)
    batch = batched.add_batch(replay)
    assert [(offset, w.window_id, cut) for offset, w, cut in batch.closed] == [(cut_line, w.window_id, True)
                                                                               for w in held]
    after = [ln for ln in lines if ln.offset >= fence]
    assert ids(feed(batched, after) + batched.flush()) == ids(feed(second, after) + second.flush())
    third = CountWindower("t", 0, size, stride)
    third.restore(snapshot, fence)
    published = [w for ln in lines if ln.offset >= commit for w in third.add(ln).closed] + third.flush()
    assert ids(emitted + published) == ids(ref_windows)


def test_a_count_cut_commit_fences_at_the_position_and_its_line_closes_the_windows_again() -> None:
    """Ten lines, a record after the tenth that is no line, quiet: the cut's commit fences at the
    position (11), so the record is never handled twice; replayed, line 9 closes the cut's window again."""
    windower = CountWindower("t", 0, 50)
    feed(windower, [line(i) for i in range(10)])
    held = windower.cut()
    assert windower.snapshot() == {"cuts": [9]}
    replay = CountWindower("t", 0, 50)
    replay.restore({"cuts": [9]}, fence=11)
    results = [replay.add(line(i)) for i in range(10)]
    assert [r.cut for r in results] == [0] * 9 + [1]
    assert ids(results[-1].closed) == ids(held) and results[-1].closed[0].close_reason == "idle"
    assert replay.open_windows == 0


def test_the_trainer_bounds_event_time_as_the_consumer_does(tmp_path) -> None:  # noqa: ANN001
    from logstream.settings import Settings
    from tests.hardening_inputs import CLOCK_AHEAD_HDFS
    from trainer.data import load_split
    from trainer.evaluate import session_options

    log = tmp_path / "hdfs.log"
    log.write_text("\n".join(CLOCK_AHEAD_HDFS) + "\n")
    labels = tmp_path / "labels.csv"
    blocks = ["blk_38865049064139660", "blk_-6952295868487656571", "blk_7128370237687728475"]
    labels.write_text("BlockId,Label\n" + "".join(f"{b},Normal\n" for b in blocks))
    settings = Settings(session_gap=300.0)
    assert session_options(settings)["max_future"] == 330.0  # the consumer's default: gap + grace
    split = load_split("hdfs", log, labels, train_fraction=0.5, **session_options(settings))
    sizes = {w.window.key: w.window.size for w in split.train + split.test}
    assert sizes == dict(zip(blocks, [2, 3, 1])) and split.stats["skipped_lines"] == {"future_timestamp": 1}
    assert Settings(max_future_s=0).future_bound(300.0) is None
