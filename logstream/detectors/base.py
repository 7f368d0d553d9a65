"""The detector contract shared by the consumer, the trainer's evaluation and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from logstream.records import Verdict, Window


@runtime_checkable
class Detector(Protocol):
    """Scores windows. Lifecycle: built once at start, `score` called from one scoring thread, `close` at exit.

    `score` may block for as long as the model needs (the poll loop keeps the consumer alive and
    pauses partitions meanwhile); it returns exactly one verdict per window, in order.
    """

    name: str
    version: str

    def score(self, windows: Sequence[Window]) -> list[Verdict]: ...

    def close(self) -> None: ...


class DetectorNotReady(RuntimeError):
    """A detector cannot start as configured (missing or mismatched artifact); the message says why."""
