"""Noticing a detector serving logs it was not trained for: the share of never-seen templates.

A model judges what it learned. Served on other logs (the shipped BGL LogLLM on application logs)
it scores everything alike and says nothing: no alert, no error. What does change is visible
before any model runs: nearly every masked template of the traffic is one the training data never
held. So each artifact records, at training time, the templates it was fitted on and the share of
held-out lines whose template was not among them (`TrainingCoverage`, key `coverage` in the
artifact's JSON); a detector exposes it as `template_coverage()` (`CoverageAware`); and the
scoring thread feeds every judged window to a `CoverageMonitor`, which keeps the share over the
last lines, exports it, and warns (rate-limited) when it is far above the training-time share,
naming the artifact's dataset.

"Far above": over `alarm_share(trained)` = trained + 0.75 x (1 - trained), three quarters of the
way from the training-time share to 100 %, measured over the latest 5,000 judged lines (at least
1,000). Another system's logs are near 100 % (HDFS or Thunderbird lines against the shipped BGL
models: 1.0). Anomalies on the right system stay below it: the anomaly-heavy BGL 2k sample has
32 % of its lines unseen by the shipped BGL models, 54 % in its worst 1,000 lines.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from logstream.logs import get_logger
from logstream.records import Window

log = get_logger(__name__)

HELD_OUT_SHARE = 0.2  # novelty fit: the latest 20 % of its lines stand in for unseen traffic
ALARM_FRACTION = 0.75  # of the way from the training-time share to 100 %
RECENT_LINES = 5000  # the share is measured over about this many of the latest judged lines
MIN_LINES = 1000  # no verdict on fewer lines
WARN_INTERVAL_S = 600.0  # at most one warning this often while the share stays high
_EXAMPLES = 3


def alarm_share(trained: float) -> float:
    """The live unseen-template share above which a detector is warned about (see the module docstring)."""
    return trained + ALARM_FRACTION * (1.0 - trained)


@dataclass(frozen=True, slots=True)
class TrainingCoverage:
    """What an artifact was trained on: its dataset, its templates, and the unseen share it saw then.

    `unseen_share` (0..1) is the share of held-out lines (a test split, or the latest lines of the
    fit) whose masked template is not in `templates`; None when the artifact did not record it
    (it is then taken as 0).
    """

    dataset: str
    templates: frozenset[str]
    unseen_share: float | None = None

    @classmethod
    def measure(cls, dataset: str, train: Iterable[str], held_out: Iterable[str]) -> TrainingCoverage:
        """From the masked templates of the training lines and of held-out lines (one per line)."""
        known = frozenset(train)
        lines = unseen = 0
        for template in held_out:
            lines += 1
            unseen += template not in known
        return cls(dataset, known, unseen / lines if lines else None)

    @classmethod
    def from_stream(cls, dataset: str, templates: Iterable[str], held_out_share: float = HELD_OUT_SHARE
                    ) -> TrainingCoverage:
        """For a fit on every line (novelty): the share of the latest `held_out_share` of the lines whose
        template first appeared there, i.e. how often the traffic still brought new templates."""
        first_seen: dict[str, int] = {}
        count = 0
        for count, template in enumerate(templates, start=1):
            first_seen.setdefault(template, count - 1)
        start = int(count * (1.0 - held_out_share))
        tail = count - start
        new = sum(1 for index in first_seen.values() if index >= start)
        return cls(dataset, frozenset(first_seen), new / tail if tail else None)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "unseen_share": self.unseen_share, "templates": sorted(self.templates)}

    @classmethod
    def from_json(cls, body: Any) -> TrainingCoverage | None:
        """The recorded coverage, or None when the artifact has none (or an unreadable one)."""
        if not isinstance(body, dict) or not isinstance(body.get("templates"), list):
            return None
        share = body.get("unseen_share")
        return cls(str(body.get("dataset", "")), frozenset(map(str, body["templates"])),
                   float(share) if isinstance(share, (int, float)) else None)


@dataclass(frozen=True, slots=True)
class TemplateCoverage:
    """What a detector tells the monitor: where it was trained, which templates it knows, the trained share."""

    dataset: str
    known: Callable[[str], bool]
    trained_unseen_share: float | None = None

    @classmethod
    def of(cls, training: TrainingCoverage) -> TemplateCoverage:
        return cls(training.dataset, training.templates.__contains__, training.unseen_share)


@runtime_checkable
class CoverageAware(Protocol):
    """A detector that can say which templates it was trained on (None: it cannot, e.g. an old artifact)."""

    def template_coverage(self) -> TemplateCoverage | None: ...


class CoverageMonitor:
    """The live share of judged lines whose template the detector never saw; warns when far above training.

    `observe` is called from the scoring thread after each batch. `on_share(share, trained, alarm)`
    exports the figures (the pipeline sets gauges); `on_warning()` counts warnings.
    """

    def __init__(
        self,
        detector: str,
        coverage: TemplateCoverage,
        *,
        on_share: Callable[[float, float, float], None] | None = None,
        on_warning: Callable[[], None] | None = None,
        recent_lines: int = RECENT_LINES,
        min_lines: int = MIN_LINES,
        warn_interval_s: float = WARN_INTERVAL_S,
    ) -> None:
        self.detector = detector
        self.coverage = coverage
        self.trained = coverage.trained_unseen_share or 0.0
        self.alarm = alarm_share(self.trained)
        self._on_share = on_share
        self._on_warning = on_warning
        self._recent_lines = recent_lines
        self._min_lines = min_lines
        self._warn_interval_s = warn_interval_s
        self._batches: deque[tuple[int, int]] = deque()  # (lines, unseen) per observed batch
        self._lines = self._unseen = 0
        self._examples: deque[str] = deque(maxlen=_EXAMPLES)
        self._known_cache: dict[str, bool] = {}
        self._warned_at: float | None = None
        self.high = False
        self.warnings = 0

    @classmethod
    def for_detector(cls, detector: object, **kwargs: Any) -> CoverageMonitor | None:
        """A monitor for a detector that reports its coverage; None for one that does not (null, old artifacts)."""
        if not isinstance(detector, CoverageAware):
            return None
        coverage = detector.template_coverage()
        if coverage is None:
            return None
        return cls(str(getattr(detector, "name", type(detector).__name__)), coverage, **kwargs)

    @property
    def share(self) -> float:
        return self._unseen / self._lines if self._lines else 0.0

    def _known(self, template: str) -> bool:
        found = self._known_cache.get(template)
        if found is None:
            if len(self._known_cache) >= 100_000:
                self._known_cache.clear()
            found = self._known_cache[template] = bool(self.coverage.known(template))
        return found

    def observe(self, windows: Sequence[Window]) -> None:
        """Count the judged windows' lines and their unseen templates; export; warn or clear."""
        lines = unseen = 0
        for window in windows:
            for template in window.templates:
                lines += 1
                if not self._known(template):
                    unseen += 1
                    if template not in self._examples:
                        self._examples.append(template)
        if not lines:
            return
        self._batches.append((lines, unseen))
        self._lines += lines
        self._unseen += unseen
        while len(self._batches) > 1 and self._lines - self._batches[0][0] >= self._recent_lines:
            old_lines, old_unseen = self._batches.popleft()
            self._lines -= old_lines
            self._unseen -= old_unseen
        if self._on_share is not None:
            self._on_share(self.share, self.trained, self.alarm)
        if self._lines >= self._min_lines:
            self._judge()

    def _judge(self) -> None:
        share = self.share
        now = time.monotonic()
        if share > self.alarm:
            if self._warned_at is None or now - self._warned_at >= self._warn_interval_s:
                self._warned_at = now
                self.high = True
                self.warnings += 1
                if self._on_warning is not None:
                    self._on_warning()
                log.warning(
                    "unseen_templates_high", detector=self.detector, dataset=self.coverage.dataset,
                    unseen_share=round(share, 3), trained_unseen_share=round(self.trained, 3),
                    alarm_share=round(self.alarm, 3), lines=self._lines, examples=list(self._examples),
                    hint=f"most templates are new to this model: is this traffic like its training data "
                         f"({self.coverage.dataset})? check --format, or train on these logs",
                )
        elif self.high and share <= self.alarm:
            self.high = False
            self._warned_at = None
            log.info("unseen_templates_normal", detector=self.detector, dataset=self.coverage.dataset,
                     unseen_share=round(share, 3), alarm_share=round(self.alarm, 3))
