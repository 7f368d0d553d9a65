"""What a new owner of a partition trusts of a commit: window settings (fingerprint) and the log (offsets).

The fingerprint: equal settings give equal digests, any setting that decides windows changes it, other
settings do not. The decision (`resume_position`): a commit of other settings replays from its offset with
no fence and no snapshot, one beyond the log's end starts from the earliest offset, a commit of an older
logstream (no fingerprint) is taken as it is. Through the real ingest path: a record below the position
read (the client reset its offset) starts the partition afresh instead of being suppressed as a replay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Message
from structlog.testing import capture_logs

from logstream.checkpoint import CommittedPosition, PartitionCut, parse_metadata
from logstream.deadletters import DeadLetterWatch
from logstream.errors import FatalFlag
from logstream.fingerprint import window_fingerprint
from logstream.ingest import Ingest
from logstream.logs import LogThrottle
from logstream.metrics import Metrics
from logstream.parsing import LineParser
from logstream.partitions import TP, PartitionState
from logstream.records import Window
from logstream.resume import BEYOND_END, SETTINGS_CHANGED, resume_position, warn
from logstream.settings import Settings
from logstream.windows import make_windower, window_options

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"
BGL = (SAMPLES / "BGL_2k.log").read_bytes().splitlines()
HDFS = (SAMPLES / "HDFS_2k.log").read_bytes().splitlines()
PART: TP = ("raw", 0)


def fingerprint(**options: Any) -> str:
    return window_fingerprint(Settings(**options)).digest


# --- the fingerprint ------------------------------------------------------------------------------


COUNT = {"format": "bgl", "window": "count", "window_size": 100}
SESSION = {"format": "hdfs", "window": "session"}


def test_same_settings_give_the_same_fingerprint() -> None:
    assert fingerprint(**COUNT) == fingerprint(**COUNT)
    assert fingerprint(**SESSION) == fingerprint(**SESSION)
    summary = window_fingerprint(Settings(**COUNT)).summary
    assert summary == "format=bgl max_line_bytes=1048576 window=count size=100 stride=100"
    assert len(fingerprint(**COUNT)) == 16


@pytest.mark.parametrize("base,change", [
    (COUNT, {"window_size": 50}),
    (COUNT, {"window_stride": 50}),
    (COUNT, {"format": "hdfs"}),
    (COUNT, {"format": "generic"}),
    (COUNT, {"max_line_bytes": 4096}),
    (COUNT, {"window": "session"}),
    (SESSION, {"window": "count"}),
    (SESSION, {"session_gap": 300.0}),
    (SESSION, {"session_gap": 86_400.5}),
    (SESSION, {"format": "bgl"}),  # the default gap follows the format (one day for hdfs, 300 s otherwise)
    (SESSION, {"session_grace": 0.0}),
    (SESSION, {"session_max_lines": 10}),
    (SESSION, {"session_max_open": 10}),
    (SESSION, {"max_future_s": 60.0}),
    (SESSION, {"max_future_s": 0.0}),
    (SESSION, {"future_policy": "clamp"}),
    (SESSION, {"future_confirm_lines": 5}),
])
def test_any_windowing_setting_changes_the_fingerprint(base: dict[str, Any], change: dict[str, Any]) -> None:
    assert fingerprint(**base) != fingerprint(**{**base, **change})


@pytest.mark.parametrize("base,change", [
    (COUNT, {"session_gap": 60.0, "session_max_lines": 3, "future_policy": "clamp"}),  # session settings
    (SESSION, {"window_size": 7, "window_stride": 7}),  # count settings
    (SESSION, {"session_gap": 86_400.0}),  # hdfs's default gap, given
    (SESSION, {"max_future_s": 86_430.0}),  # the default bound (gap + grace), given
    (COUNT, {"window_stride": 100}),  # the default stride, given
    (COUNT, {"window_idle_s": 5.0, "session_idle_s": 5.0}),  # a cut is recorded by offset, replayed anyway
    (COUNT, {"detector": "novelty", "emit": "all", "commit_interval_s": 1.0, "guarantee": "exactly-once",
             "batch_size": 3, "group_id": "other"}),
])
def test_settings_that_decide_no_window_leave_the_fingerprint(base: dict[str, Any], change: dict[str, Any]) -> None:
    assert fingerprint(**base) == fingerprint(**{**base, **change})


def test_with_no_event_time_bound_its_policy_does_not_matter() -> None:
    off = {**SESSION, "max_future_s": 0.0}
    assert fingerprint(**off) == fingerprint(**off, future_policy="clamp", future_confirm_lines=9)


# --- the commit metadata --------------------------------------------------------------------------


def test_the_metadata_carries_the_fingerprint_and_reads_back() -> None:
    settings = window_fingerprint(Settings(**SESSION))
    part = PartitionCut(1700, 1799, 3, {"open": [["blk_1", 1700]], "stream_time": 1.0}, settings=settings)
    body = orjson.loads(part.metadata())
    assert body["settings_id"] == settings.digest and body["settings"] == settings.summary
    position = parse_metadata(1700, part.metadata())
    assert (position.offset, position.fence, position.settings_id, position.settings, position.reset) == (
        1700, 1799, settings.digest, settings.summary, None)
    assert position.snapshot == {"open": [["blk_1", 1700]], "stream_time": 1.0}


def test_metadata_of_an_older_version_has_no_fingerprint() -> None:
    position = parse_metadata(1700, '{"v":1,"fence":1799,"snapshot":{"cuts":[1750]}}')
    assert (position.fence, position.snapshot, position.settings_id) == (1799, {"cuts": [1750]}, None)
    assert parse_metadata(5, "").settings_id is None


def test_the_largest_inline_snapshot_with_a_fingerprint_fits_kafkas_metadata_limit() -> None:
    """Inline snapshots are at most INLINE_SNAPSHOT_LIMIT bytes; the fingerprint adds a few hundred."""
    settings = window_fingerprint(Settings(**SESSION, session_gap=123_456.789, max_future_s=987_654.321,
                                           future_policy="dead-letter", max_line_bytes=10**12))
    snapshot = {"open": [["blk_-" + "9" * 19, 10**18 + i] for i in range(40)], "stream_time": 1.7e9,
                "bound": [1.7e9, 1.7e9, 2]}
    part = PartitionCut(10**18, 10**18, 1, snapshot, settings=settings)
    assert not part.needs_state_record
    assert len(part.metadata().encode()) < 4096


# --- the decision ---------------------------------------------------------------------------------


NOW = window_fingerprint(Settings(**COUNT))
OLD = window_fingerprint(Settings(**{**COUNT, "window_size": 50}))


def committed(settings_id: str | None, offset: int = 1700, fence: int = 1799) -> CommittedPosition:
    return CommittedPosition(offset, fence, {"cuts": [1750]}, ((0, 12),), settings_id, "summary")


def test_a_commit_of_the_same_settings_is_resumed_as_committed() -> None:
    position = committed(NOW.digest)
    resume = resume_position(position, NOW, (0, 1799))
    assert resume.position == position and resume.seek is None and resume.reason is None


def test_a_commit_of_other_settings_replays_from_its_offset_without_fence_or_snapshot() -> None:
    resume = resume_position(committed(OLD.digest), NOW, (0, 1799))
    assert resume.reason == SETTINGS_CHANGED and resume.seek is None
    position = resume.position
    assert (position.offset, position.fence, position.snapshot, position.state_refs, position.reset) == (
        1700, 1700, None, (), SETTINGS_CHANGED)


def test_a_commit_without_a_fingerprint_is_taken_as_matching() -> None:
    position = committed(None)
    assert resume_position(position, NOW, (0, 1799)).position == position


def test_a_commit_beyond_the_logs_end_starts_from_the_earliest_offset() -> None:
    for settings_id in (NOW.digest, OLD.digest, None):  # whatever the settings: the log starts afresh
        resume = resume_position(committed(settings_id), NOW, (3, 500))
        assert resume.reason == BEYOND_END and resume.seek == 3
        assert resume.position == CommittedPosition(3, 3, None, reset=BEYOND_END)


def test_a_commit_at_the_logs_end_or_with_unknown_bounds_is_not_checked_against_the_log() -> None:
    position = committed(NOW.digest, offset=1799)
    assert resume_position(position, NOW, (0, 1799)).position == position
    assert resume_position(committed(NOW.digest, offset=5000), NOW, None).reason is None


def test_nothing_committed_is_a_plain_start() -> None:
    position = CommittedPosition(None, 0, None)
    assert resume_position(position, NOW, (0, 0)).position == position


def test_the_repartitioner_checks_the_log_only() -> None:
    position = committed(OLD.digest)
    assert resume_position(position, None, (0, 1799)).position == position
    assert resume_position(position, None, (0, 10)).reason == BEYOND_END


def test_each_drop_is_one_warning_naming_old_and_new_settings() -> None:
    position = CommittedPosition(1700, 1799, None, (), OLD.digest, OLD.summary)
    with capture_logs() as logs:
        warn(PART, position, resume_position(position, NOW, (0, 1799)), NOW, (0, 1799))
        warn(PART, position, resume_position(position, NOW, (0, 10)), NOW, (0, 10))
        warn(PART, position, resume_position(position, OLD, (0, 1799)), OLD, (0, 1799))  # matching: nothing
    assert [entry["event"] for entry in logs] == [SETTINGS_CHANGED, BEYOND_END]
    assert logs[0]["old"] == OLD.summary and logs[0]["new"] == NOW.summary and "1700" in logs[0]["consequence"]
    assert logs[0]["log_level"] == logs[1]["log_level"] == "warning"


def test_a_dropped_commit_is_committed_again_at_the_first_cut() -> None:
    """The broker still holds the old fence: the first cut commits even at the same offset, with the new settings."""
    position = resume_position(committed(OLD.digest), NOW, (0, 1799)).position
    state = PartitionState(PART, make_windower("count", *PART, size=100), 1, position, Metrics(), NOW)
    assert state.last_committed is None and state.fence == 1700
    part = state.cut()
    assert part is not None and (part.commit_offset, part.fence) == (1700, 1700)
    assert parse_metadata(part.commit_offset, part.metadata()).settings_id == NOW.digest


# --- an offset reset while running, through the ingest path ---------------------------------------


class Harness:
    """One partition fed through the real `Ingest`, adopted from a commit as `Pipeline._adopt` does."""

    def __init__(self, kind: str, values: list[bytes], position: CommittedPosition, **options: Any) -> None:
        fmt = "bgl" if values is BGL else "hdfs"
        self.settings = Settings(input_topic=[PART[0]], format=fmt, window=kind, **options)
        self.values = values
        self.windows: list[tuple[int, int, str]] = []
        self.dead_letters: list[int] = []
        metrics = Metrics()
        harness = self

        class Publisher:
            def dead_letter(self, state: PartitionState, message: Message, reason: str, detail: str) -> None:
                harness.dead_letters.append(message.offset())

        self.ingest = Ingest(self.settings, LineParser(fmt), metrics, Publisher(),  # type: ignore[arg-type]
                             DeadLetterWatch(metrics, fmt, kind), FatalFlag(), LogThrottle(10.0), self._submit)
        windower = make_windower(kind, *PART, **window_options(self.settings))
        self.state = PartitionState(PART, windower, 1, position, metrics, window_fingerprint(self.settings))
        if position.snapshot is not None:
            windower.restore(position.snapshot, position.fence)

    def _submit(self, state: PartitionState, windows: list[Window]) -> None:
        self.windows.extend((w.first_offset, w.last_offset, w.close_reason) for w in windows)

    def deliver(self, *runs: tuple[range, list[bytes]]) -> None:
        """One consume batch: the records at the offsets of each run, taken from its log, in that order."""
        self.ingest.handle([Message(topic=PART[0], partition=PART[1], offset=offset, value=values[offset],
                                    timestamp=(1, 1_700_000_000_000 + offset))
                            for run, values in runs for offset in run], {PART: self.state})


NEW_LOG = BGL[1000:]  # the records of the recreated topic


def old(run: range) -> tuple[range, list[bytes]]:
    return run, BGL


def new(run: range) -> tuple[range, list[bytes]]:
    return run, NEW_LOG


@pytest.mark.parametrize("batches", [
    [[old(range(20, 35))], [new(range(0, 25))]],  # the reset between two consume batches
    [[old(range(20, 35)), new(range(0, 25))]],  # within one batch
    [[old(range(20, 30))], [old(range(30, 35)), new(range(0, 5))], [new(range(5, 25))]],
])
def test_a_record_below_the_position_starts_the_partition_afresh(
        batches: list[list[tuple[range, list[bytes]]]]) -> None:
    """Adopted from a commit at 20 fenced at 35 (windows up to 35 published), the consumer replays 20..34;
    then the client resets the offset to 0 (a recreated topic): records 0..24 of the new log are judged,
    none is suppressed below the old fence, and the old log's open window (30..34) is judged too."""
    harness = Harness("count", BGL, CommittedPosition(20, 35, None), window_size=10)
    with capture_logs() as logs:
        for runs in batches:
            harness.deliver(*runs)
    resets = [entry for entry in logs if entry["event"] == "offset_reset"]
    assert len(resets) == 1 and (resets[0]["offset"], resets[0]["position"], resets[0]["fence"]) == (0, 35, 35)
    assert harness.windows == [(30, 34, "end_of_input"), (0, 9, "size"), (10, 19, "size")]
    state = harness.state
    assert (state.position, state.fence, state.origin, state.last_committed) == (25, 0, 0, None)
    part = state.cut()
    assert part is not None and (part.commit_offset, part.fence) == (20, 25)


def test_an_offset_reset_judges_the_old_logs_sessions_and_opens_new_ones() -> None:
    harness = Harness("session", HDFS, CommittedPosition(None, 0, None), session_gap=1e9)
    harness.deliver((range(0, 50), HDFS))
    open_before = harness.state.windower.open_windows
    assert open_before and not harness.windows
    harness.deliver((range(0, 10), HDFS[1000:]))
    assert len(harness.windows) == open_before and {reason for _, _, reason in harness.windows} == {"end_of_input"}
    state = harness.state
    assert (state.fence, state.position) == (0, 10)
    assert state.windower.open_windows and state.windower.oldest_open_offset() == 0


def test_offsets_that_only_grow_are_no_reset() -> None:
    harness = Harness("count", BGL, CommittedPosition(20, 20, None), window_size=10)
    with capture_logs() as logs:
        harness.deliver(old(range(20, 25)), old(range(27, 40)))  # a hole (transaction marker, compaction)
        harness.deliver(old(range(40, 45)))
    assert not [entry for entry in logs if entry["event"] == "offset_reset"]
    assert harness.windows == [(20, 31, "size"), (32, 41, "size")]
    assert (harness.state.fence, harness.state.position) == (20, 45)
