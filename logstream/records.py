"""The data that flows through logstream: parsed lines, completed windows and verdicts.

A `LogLine` is one raw record after parsing and masking; a `Window` is a closed group of lines
with a deterministic id (same input offsets, same id); a `Verdict` is a detector's judgement.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

WindowKind = Literal["count", "session"]
# Where a line's event time comes from: its own timestamp; the last one seen before it on its
# partition (a line without a time, such as a stack-trace continuation); the Kafka record's
# timestamp (no time seen yet on the partition; 0.0 for a file line).
TimeSource = Literal["line", "inherited", "record"]
CloseReason = Literal["size", "gap", "max_size", "cap", "idle", "end_of_input"]


class LogLine(NamedTuple):
    """One parsed record of a raw topic (or of a log file, for the trainer).

    A named tuple: immutable, and built in bulk at C speed (`tuple.__new__` over zipped columns: a
    consume batch's lines, `parsing.LineParser.parse_batch`), about 0.3 µs a line less than a frozen
    dataclass. A changed copy is `line._replace(field=value)`."""

    topic: str
    partition: int
    offset: int
    raw: str  # the decoded line, without its line terminator
    template: str  # the content with variables masked as <*>
    event_time: float  # seconds since the epoch; where it comes from: `time_source`
    label: bool | None = None  # True = anomalous, where the format carries a label
    block_ids: tuple[str, ...] = ()
    time_source: TimeSource = "line"


@dataclass(slots=True)
class Window:
    """A closed window of lines, ready to be scored. Raises ValueError without lines.

    Its lines are not changed once it is closed (the id is read from the first and last offsets)."""

    kind: WindowKind
    key: str  # block id for sessions; "<topic>/<partition>" for count windows
    topic: str
    partition: int
    lines: list[LogLine]
    close_reason: CloseReason
    _id: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError("a window holds at least one line")

    @property
    def window_id(self) -> str:
        """`window_id` of this window, hashed on first use: most windows are judged normal and never
        published, so most never need it (a session window closes every ~7 HDFS lines)."""
        if not self._id:
            self._id = window_id(self.topic, self.partition, self.kind, self.key, self.first_offset, self.last_offset)
        return self._id

    @property
    def first_offset(self) -> int:
        return self.lines[0].offset

    @property
    def last_offset(self) -> int:
        return self.lines[-1].offset

    @property
    def first_event_time(self) -> float:
        return min(line.event_time for line in self.lines)

    @property
    def last_event_time(self) -> float:
        return max(line.event_time for line in self.lines)

    @property
    def size(self) -> int:
        return len(self.lines)

    @property
    def templates(self) -> list[str]:
        return [line.template for line in self.lines]

    def template_counts(self) -> Counter[str]:
        return Counter(line.template for line in self.lines)

    @property
    def label(self) -> bool | None:
        """Ground truth where the lines carry labels: anomalous if any line is."""
        labels = [line.label for line in self.lines if line.label is not None]
        return any(labels) if labels else None


def window_id(topic: str, partition: int, kind: str, key: str, first_offset: int, last_offset: int) -> str:
    """Deterministic id: a replay of the same offsets yields the same id."""
    text = f"{topic}\x1f{partition}\x1f{kind}\x1f{key}\x1f{first_offset}\x1f{last_offset}"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(slots=True, frozen=True)
class Verdict:
    """A detector's judgement of one window.

    `score` is 0-100 (100 = surely anomalous). `evidence` names the lines that drove the
    decision where the detector can tell (indices into `Window.lines`, with a reason each).
    """

    anomalous: bool
    score: float
    evidence: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 100.0:
            raise ValueError(f"score {self.score} outside 0-100")
