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


def _event_time(window: Window) -> dict[str, Any]:
    """First and last event time, and (when any) how many lines had no time of their own: inherited
    from an earlier line of the partition, or the Kafka record's (see `LogLine.time_source`)."""
    times = [line.event_time for line in window.lines]
    result: dict[str, Any] = {"first": _iso(min(times)), "last": _iso(max(times))}
    inherited = record = 0
    for line in window.lines:
        if line.time_source != "line":
            if line.time_source == "inherited":
                inherited += 1
            else:
                record += 1
    if inherited:
        result["inherited_lines"] = inherited
    if record:
        result["record_time_lines"] = record
    return result


def _index_templates(window: Window) -> tuple[dict[str, int], dict[str, int]]:
    """Count per template and index of its first line, in one pass (first-occurrence order)."""
    counts: dict[str, int] = {}
    first_of: dict[str, int] = {}
    for i, line in enumerate(window.lines):
        template = line.template
        seen = counts.get(template)
        if seen is None:
            counts[template] = 1
            first_of[template] = i
        else:
            counts[template] = seen + 1
    return counts, first_of


def representative_lines(
    window: Window, verdict: Verdict, index: tuple[dict[str, int], dict[str, int]] | None = None
) -> list[dict[str, Any]]:
    """Up to five lines: those the detector named first, then the first line of each rarest template."""
    counts, first_of = index if index is not None else _index_templates(window)
    chosen: list[int] = []
    for item in verdict.evidence:
        line_index = item.get("line")
        if isinstance(line_index, int) and 0 <= line_index < window.size and line_index not in chosen:
            chosen.append(line_index)
    if len(chosen) < MAX_SAMPLE_LINES:
        for template in sorted(first_of, key=lambda t: (counts[t], first_of[t])):
            if first_of[template] not in chosen:
                chosen.append(first_of[template])
                if len(chosen) == MAX_SAMPLE_LINES:
                    break
    picked = [window.lines[i] for i in chosen[:MAX_SAMPLE_LINES]]
    return [{"offset": line.offset, "line": line.raw[:MAX_LINE_CHARS]} for line in picked]


def build_alert(window: Window, verdict: Verdict, detector_name: str, detector_version: str) -> dict[str, Any]:
    """The alert document (see the schema); one pass over the lines for counts, samples and times."""
    index = _index_templates(window)
    counts = index[0]
    # most frequent first, ties in first-occurrence order (what Counter.most_common gives)
    top = sorted(counts.items(), key=_count_of, reverse=True)[:MAX_TEMPLATES]
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
        "event_time": _event_time(window),
        "verdict": {
            "label": "anomalous" if verdict.anomalous else "normal",
            "score": round(float(verdict.score), 3),
            "severity": severity(verdict),
        },
        "templates": [{"template": t, "count": c} for t, c in top],
        "distinct_templates": len(counts),
        "sample_lines": representative_lines(window, verdict, index),
        "evidence": [dict(item) for item in verdict.evidence],
        "created_at": _iso(time.time()),
    }


def _count_of(item: tuple[str, int]) -> int:
    return item[1]


def encode_alert(alert: dict[str, Any]) -> bytes:
    return orjson.dumps(alert)
