"""The `null` detector: judges every window normal. For plumbing checks and throughput benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from logstream.records import Verdict, Window
from logstream.settings import Settings

_NORMAL = Verdict(anomalous=False, score=0.0)


class NullDetector:
    name = "null"
    version = "1"

    @classmethod
    def from_settings(cls, settings: Settings) -> NullDetector:
        return cls()

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        return [_NORMAL] * len(windows)

    def close(self) -> None:
        return None
