"""An idle cut, its commit and a restart before the next commit, through the consumer's ingest path.

Real sample lines and bad records go through `Ingest` into a `PartitionState` and its windower; a
commit is modelled as the pipeline makes it with `--guarantee exactly-once` (`PartitionState.cut`,
the outputs issued before it go with it, the idle cut's windows are released after it and go with
the next), and a crash drops every output since the last commit, adopts the partition again from
that commit (`parse_metadata` of its metadata) and reads it again up to where the crashed consumer
had read. Whatever the crash, the committed outputs must be those of a run without it, each once:
the cut's windows with the same ids, and the dead letter of a record read before the cut (after the
cut's line) not twice.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message

from logstream.checkpoint import CommittedPosition, PartitionCut, parse_metadata
from logstream.deadletters import DeadLetterWatch
from logstream.errors import FatalFlag
from logstream.ingest import Ingest
from logstream.logs import LogThrottle
from logstream.metrics import Metrics
from logstream.parsing import LineParser
from logstream.partitions import TP, PartitionState
from logstream.records import Window
from logstream.settings import Settings
from logstream.windows import make_windower, window_options

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"
HDFS = (SAMPLES / "HDFS_2k.log").read_bytes().splitlines()
BAD = b"\xff\xfe not utf-8"  # dead-lettered as undecodable
PART: TP = ("raw", 0)
IDLE_S = 2.0

Output = tuple[Any, ...]  # ("dlq", offset, reason) or ("window", id, close reason, first offset, last offset)


class Consumer:
    """One partition's consumer around the real ingest path, with commits, crashes and restarts."""

    def __init__(self, kind: str, values: list[bytes], batch: int, **options: Any) -> None:
        self.settings = Settings(input_topic=[PART[0]], format="hdfs", window=kind, window_idle_s=IDLE_S,
                                 session_idle_s=IDLE_S, guarantee="exactly-once", **options)
        self.values = values
        self.batch = batch
        self.read = 0  # next offset to deliver
        self.committed = CommittedPosition(None, 0, None)
        self.durable: list[Output] = []  # outputs of committed transactions
        self.open: list[Output] = []  # outputs of the open transaction
        self.state = self._adopt(self.committed)

    def _adopt(self, position: CommittedPosition) -> PartitionState:
        """What `Pipeline._adopt` does: a fresh windower, restored from the commit's snapshot."""
        metrics = Metrics()
        consumer = self

        class Publisher:
            def dead_letter(self, state: PartitionState, message: Message, reason: str, detail: str) -> None:
                consumer.open.append(("dlq", message.offset(), reason))

        self.ingest = Ingest(self.settings, LineParser("hdfs"), metrics, Publisher(),  # type: ignore[arg-type]
                             DeadLetterWatch(metrics, "hdfs", self.settings.window), FatalFlag(), LogThrottle(10.0),
                             self._submit)
        windower = make_windower(self.settings.window, *PART, **window_options(self.settings))
        state = PartitionState(PART, windower, 1, position, metrics)
        if position.snapshot is not None and position.offset is not None:
            windower.restore(position.snapshot, position.fence)
        self.read = position.offset or 0
        return state

    def _submit(self, state: PartitionState, windows: list[Window]) -> None:
        self.open.extend(("window", w.window_id, w.close_reason, w.first_offset, w.last_offset) for w in windows)

    def deliver(self, upto: int | None = None) -> None:
        """Consume batches up to `upto` (default: every value), then the end-of-partition event."""
        upto = len(self.values) if upto is None else upto
        while self.read < upto:
            end = min(upto, self.read + self.batch)
            self.ingest.handle([Message(topic=PART[0], partition=PART[1], offset=offset, value=self.values[offset],
                                        timestamp=(1, 1_700_000_000_000 + offset)) for offset in range(self.read, end)],
                               {PART: self.state})
            self.read = end
        self.ingest.handle([Message(topic=PART[0], partition=PART[1], error=KafkaError(KafkaError._PARTITION_EOF))],
                           {PART: self.state})

    def idle_cut(self) -> PartitionCut:
        """Quiet past the idle time: the cut, and the commit the pipeline takes at once (`cut_now`)."""
        assert self.state.idle_cut(math.inf, IDLE_S), "read to its end and quiet: the open windows are cut"
        part = self.state.cut()
        assert part is not None
        return part

    def commit(self, part: PartitionCut | None, issued_before: int | None = None) -> None:
        """The transaction of `part` commits (with the outputs issued before it was taken: `issued_before`,
        default all); the idle cut's windows it recorded are released into the next transaction."""
        if part is None:
            return
        issued_before = len(self.open) if issued_before is None else issued_before
        self.committed = parse_metadata(part.commit_offset, part.metadata())
        self.durable += self.open[:issued_before]
        self.open = self.open[issued_before:]
        self.state.last_committed = (part.commit_offset, part.fence)
        if self.state.idle_held:
            self._submit(self.state, self.state.release_idle())

    def crash(self) -> None:
        """The open transaction is lost; the partition is adopted again from its commit and read as far."""
        read, self.open = self.read, []
        self.state = self._adopt(self.committed)
        self.deliver(read)

    def finish(self) -> Counter[Output]:
        """Commit what is left (twice: windows an idle cut still held are released by the first)."""
        self.commit(self.state.cut())
        self.commit(self.state.cut())
        self.durable += self.open
        self.open = []
        return Counter(self.durable)


def outputs(kind: str, values: list[bytes], later: list[bytes], crash: bool, batch: int,
            **options: Any) -> Counter[Output]:
    """`values`, quiet (an idle cut, committed), [a crash], then `later` and the rest committed."""
    consumer = Consumer(kind, values + later, batch, **options)
    consumer.deliver(len(values))
    consumer.commit(consumer.idle_cut())
    if crash:
        consumer.crash()
    consumer.deliver()
    return consumer.finish()


def once(counter: Counter[Output]) -> bool:
    return all(n == 1 for n in counter.values())


@pytest.mark.parametrize("kind", ["count", "session"])
@pytest.mark.parametrize("batch", [1, 3, 1000])
def test_a_record_dead_lettered_after_the_cut_line_is_not_dead_lettered_again_after_a_restart(
        kind: str, batch: int) -> None:
    """The reviewer's case: lines, then a record that is no line, read before the partition went quiet;
    the cut falls on the last line, and a restart before the next commit replays up to the position."""
    values = HDFS[:5] + [BAD]
    without = outputs(kind, values, [], crash=False, batch=batch)
    assert without[("dlq", 5, "undecodable")] == 1 and sum(1 for out in without if out[0] == "window") >= 1
    with_crash = outputs(kind, values, [], crash=True, batch=batch)
    assert once(with_crash), [out for out, n in with_crash.items() if n > 1]
    assert with_crash == without


@pytest.mark.parametrize("batch", [1, 4, 1000])
@pytest.mark.parametrize("size,stride", [(50, 50), (4, 2), (3, 1)])
def test_replayed_count_cut_windows_are_published_once_with_the_same_ids(size: int, stride: int,
                                                                         batch: int) -> None:
    """Bad records before, after and between the lines, sliding or not; more lines (and bad ones) after
    the restart: the cut's windows come once with the ids they had, no dead letter twice."""
    values = [BAD, *HDFS[:3], BAD, *HDFS[3:10], BAD, BAD]
    later = [*HDFS[10:13], BAD, *HDFS[13:15]]
    options = {"window_size": size, "window_stride": stride}
    without = outputs("count", values, later, crash=False, batch=batch, **options)
    with_crash = outputs("count", values, later, crash=True, batch=batch, **options)
    assert once(without) and once(with_crash), [out for out, n in with_crash.items() if n > 1]
    assert with_crash == without
    idle = [out[3:] for out in without if out[0] == "window" and out[2] == "idle"]
    assert idle and all(last == 11 for _, last in idle), "the cut fell on the last line read before the quiet"
    assert sorted(out[1] for out in without if out[0] == "dlq") == [0, 4, 12, 13, 17]


@pytest.mark.parametrize("kind", ["count", "session"])
@pytest.mark.parametrize("batch", [1, 1000])
def test_lines_read_while_the_cut_commits_and_a_restart(kind: str, batch: int) -> None:
    """The cut is taken, records arrive (a bad one among them) before its commit lands, a crash comes
    before the next commit: what the cut's commit covers is not repeated, what came after it is not lost."""
    values = HDFS[:5] + [BAD]
    later = [HDFS[5], BAD, HDFS[6]]
    results = []
    for crash in (False, True):
        consumer = Consumer(kind, values + later, batch)
        consumer.deliver(len(values))
        part = consumer.idle_cut()
        issued = len(consumer.open)
        consumer.deliver()  # read while the cut's transaction is still open: held for the next one
        consumer.commit(part, issued)
        if crash:
            consumer.crash()
        results.append(consumer.finish())
    without, with_crash = results
    assert once(without) and once(with_crash), [out for out, n in with_crash.items() if n > 1]
    assert with_crash == without
    assert sorted(out[1] for out in without if out[0] == "dlq") == [5, 7]
