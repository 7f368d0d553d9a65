"""Alert documents: one JSON object per judged window, as published on the alerts topic.

The schema lives in `logstream/schemas/alert.schema.json` (tests validate every alert against it).
`alert_id` is a function of the window id and the detector name only, so a replay of the same
window by the same detector yields the same id: duplicates are detectable downstream.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Any

import orjson

from logstream.records import Verdict, Window

SCHEMA_VERSION = 1
MAX_TEMPLATES = 100
MAX_SAMPLE_LINES = 5
MAX_LINE_CHARS = 2000


def alert_id(window: Window, detector_name: str) -> str:
    return hashlib.blake2b(f"{window.window_id}\x1f{detector_name}".encode(), digest_size=16).hexdigest()


def severity(verdict: Verdict) -> str:
    """Bands an SRE can route on: none (normal), low, medium, high, critical."""
    if not verdict.anomalous:
        return "none"
    if verdict.score >= 90:
        return "critical"
    if verdict.score >= 75:
        return "high"
    if verdict.score >= 50:
        return "medium"
    return "low"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def representative_lines(window: Window, verdict: Verdict) -> list[dict[str, Any]]:
    """Up to five lines: those the detector named first, then the first line of each rarest template."""
    chosen: list[int] = []
    for item in verdict.evidence:
        index = item.get("line")
        if isinstance(index, int) and 0 <= index < window.size and index not in chosen:
            chosen.append(index)
    counts = window.template_counts()
    first_of: dict[str, int] = {}
    for i, line in enumerate(window.lines):
        first_of.setdefault(line.template, i)
    for template in sorted(first_of, key=lambda t: (counts[t], first_of[t])):
        if first_of[template] not in chosen:
            chosen.append(first_of[template])
    return [
        {"offset": window.lines[i].offset, "line": window.lines[i].raw[:MAX_LINE_CHARS]}
        for i in chosen[:MAX_SAMPLE_LINES]
    ]


def build_alert(window: Window, verdict: Verdict, detector_name: str, detector_version: str) -> dict[str, Any]:
    counts = window.template_counts()
    return {
        "schema_version": SCHEMA_VERSION,
        "alert_id": alert_id(window, detector_name),
        "detector": {"name": detector_name, "version": detector_version},
        "window": {
            "id": window.window_id,
            "kind": window.kind,
            "key": window.key,
            "size": window.size,
            "close_reason": window.close_reason,
        },
        "source": {
            "topic": window.topic,
            "partition": window.partition,
            "first_offset": window.first_offset,
            "last_offset": window.last_offset,
        },
        "event_time": {"first": _iso(window.first_event_time), "last": _iso(window.last_event_time)},
        "verdict": {
            "label": "anomalous" if verdict.anomalous else "normal",
            "score": round(float(verdict.score), 3),
            "severity": severity(verdict),
        },
        "templates": [{"template": t, "count": c} for t, c in counts.most_common(MAX_TEMPLATES)],
        "distinct_templates": len(counts),
        "sample_lines": representative_lines(window, verdict),
        "evidence": [dict(item) for item in verdict.evidence],
        "created_at": _iso(time.time()),
    }


def encode_alert(alert: dict[str, Any]) -> bytes:
    return orjson.dumps(alert)
