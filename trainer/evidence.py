"""Grading alert evidence where the logs carry a label per line (BGL's alert tag).

An alert is useful when its first lines are the problem. For each true-positive window (labelled
anomalous, judged anomalous) `EvidenceTally` asks: do the detector's top-3 evidence lines include
an alert-tagged line (label != '-')? The share of windows where they do is the *evidence hit rate*.
The floor beside it is the exact expected hit rate of 3 lines drawn at random from the same window
(no seed, no sampling noise). Cost: the detector's own account of the seconds it spent on evidence
(`evidence_seconds`, `attributed`: LogLLM's attribution), or 0 for detectors whose evidence is a
by-product of the verdict (novelty, logllama).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from logstream.records import Verdict, Window

TOP = 3  # evidence lines an SRE reads first (the alerts tail prints three)


def random_hit(tagged: int, lines: int, k: int = TOP) -> float:
    """P(at least one of k lines drawn without replacement from `lines` is among the `tagged` ones)."""
    if tagged <= 0:
        return 0.0
    if lines - tagged < k:
        return 1.0
    return 1.0 - math.comb(lines - tagged, k) / math.comb(lines, k)


@dataclass
class EvidenceTally:
    """Evidence hit rate of one detector over the true positives it is shown (windows with line labels)."""

    windows: int = 0  # true positives with line labels
    hits: int = 0  # ... whose top-3 evidence holds an alert-tagged line
    first_hits: int = 0  # ... whose first evidence line is alert-tagged
    without_evidence: int = 0  # ... where the detector named no line
    floor: float = 0.0  # sum over those windows of the random pick's hit probability
    seconds: float = 0.0  # evidence cost the detector reported
    attributed: int = 0  # windows that cost was spent on

    def add(self, window: Window, verdict: Verdict) -> None:
        """Count one true-positive window; windows without line labels are skipped."""
        labels = [line.label for line in window.lines]
        if any(label is None for label in labels):
            return
        self.windows += 1
        self.floor += random_hit(sum(bool(label) for label in labels), len(labels))
        lines = [item.get("line") for item in verdict.evidence[:TOP]]
        lines = [i for i in lines if isinstance(i, int) and 0 <= i < window.size]
        if not lines:
            self.without_evidence += 1
            return
        self.hits += any(window.lines[i].label for i in lines)
        self.first_hits += bool(window.lines[lines[0]].label)

    def cost(self, detector: object, before: tuple[float, int]) -> None:
        """Add the evidence cost `detector` reported since `before` (see `evidence_account`)."""
        seconds, attributed = evidence_account(detector)
        self.seconds += seconds - before[0]
        self.attributed += attributed - before[1]

    def as_dict(self) -> dict[str, Any]:
        def share(count: float) -> float | None:
            return round(count / self.windows, 4) if self.windows else None

        return {
            "true_positives": self.windows,
            "hit_rate": share(self.hits),
            "first_line_hit_rate": share(self.first_hits),
            "without_evidence": self.without_evidence,
            "random_floor": share(self.floor),
            "extra_seconds_per_anomalous_window": round(self.seconds / self.attributed, 4) if self.attributed else 0.0,
        }


def evidence_account(detector: object) -> tuple[float, int]:
    """(seconds spent on evidence, windows it was spent on) as the detector counts them; (0, 0) when free."""
    return float(getattr(detector, "evidence_seconds", 0.0)), int(getattr(detector, "attributed", 0))


def evidence_markdown(evidence: dict[str, dict[str, Any]]) -> str:
    """The report's section: one row per detector with true positives that carry line labels."""
    rows = ["## Evidence\n",
            f"Share of true-positive windows whose top {TOP} evidence lines include an alert-tagged line "
            f"(label != '-'); the floor is {TOP} lines of the same windows picked at random (exact expectation). "
            "Extra seconds: what naming the lines cost per anomalous window (0 where the evidence is part of "
            "the verdict).\n",
            "| detector | true positives | top-3 hit rate | first line tagged | random floor | extra s per window |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, entry in evidence.items():
        rows.append(f"| {name} | {entry['true_positives']} | {_fmt(entry['hit_rate'])} | "
                    f"{_fmt(entry['first_line_hit_rate'])} | {_fmt(entry['random_floor'])} | "
                    f"{entry['extra_seconds_per_anomalous_window']:.3f} |")
    return "\n".join(rows) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
