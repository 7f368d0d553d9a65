"""Alert documents: one JSON object per judged window, as published on the alerts topic.

The schema lives in `logstream/schemas/alert.schema.json` (tests validate every alert against it).
`alert_id` is a function of the window id and the detector's name and version only (a model's
version carries its fingerprint), so a replay of the same window by the same model yields the same
id: duplicates are detectable downstream, and another model's judgement is another alert.

Size: a document always fits the budget it is encoded for (`encode_alert(alert, max_bytes)`).
Templates and sample lines longer than 2,000 characters are cut; when the whole document is still
too large, templates, sample lines and evidence are cut shorter and fewer until it fits. Every item
that was cut says `"truncated": true`, and the document lists the parts it shortened in `truncated`.
Counts (`distinct_templates`, each template's `count`, `window.size`) always stay exact.
"""

from __future__ import annotations

import functools
import hashlib
import time
from datetime import datetime, timezone
from typing import Any

import orjson

from logstream.records import Verdict, Window

SCHEMA_VERSION = 1
MAX_TEMPLATES = 100
MAX_SAMPLE_LINES = 5
MAX_LINE_CHARS = 2000  # per sample line and per template
_MIN_CHARS = 16
_SHRINK_STEPS = 12  # halvings from MAX_LINE_CHARS / MAX_TEMPLATES down to the minimal document


class OutputTooLarge(ValueError):
    """A document that does not fit its byte budget even with every truncatable part cut to the minimum."""


def _clip(item: dict[str, Any], field: str, chars: int) -> dict[str, Any]:
    text = item[field]
    if len(text) <= chars:
        return item
    return {**item, field: text[:chars], "truncated": True}


def alert_id(window: Window, detector_name: str, detector_version: str) -> str:
    """Deterministic id of one judgement: the same window judged by the same detector and model (its
    version carries the model's fingerprint) gets the same id, so a replayed duplicate dedupes on it;
    another model's judgement of that window (a model swapped on a live group) is another alert."""
    key = f"{window.window_id}\x1f{detector_name}\x1f{detector_version}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


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


# Event times repeat across the windows of a stream (a busy second names many lines): their text is kept.
_event_iso = functools.lru_cache(maxsize=8192)(_iso)


def now_iso() -> str:
    """The current time as an alert's `created_at` text (ISO 8601, UTC, `Z`)."""
    return _iso(time.time())


def _event_time(window: Window) -> dict[str, Any]:
    """First and last event time, and (when any) how many lines had no time of their own: inherited
    from an earlier line of the partition, or the Kafka record's (see `LogLine.time_source`)."""
    times = [line.event_time for line in window.lines]
    result: dict[str, Any] = {"first": _event_iso(min(times)), "last": _event_iso(max(times))}
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
    return [_clip({"offset": line.offset, "line": line.raw}, "line", MAX_LINE_CHARS) for line in picked]


def build_alert(window: Window, verdict: Verdict, detector_name: str, detector_version: str,
                created_at: str | None = None) -> dict[str, Any]:
    """The alert document (see the schema); one pass over the lines for counts, samples and times.

    `created_at`: the creation time text (`now_iso()`) that a batch of alerts built together shares
    (default: now)."""
    index = _index_templates(window)
    counts = index[0]
    # most frequent first, ties in first-occurrence order (what Counter.most_common gives)
    top = sorted(counts.items(), key=_count_of, reverse=True)[:MAX_TEMPLATES]
    templates = [_clip({"template": t, "count": c}, "template", MAX_LINE_CHARS) for t, c in top]
    samples = representative_lines(window, verdict, index)
    truncated = [part for part, items in (("templates", templates), ("sample_lines", samples))
                 if any(item.get("truncated") for item in items)]
    alert: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "alert_id": alert_id(window, detector_name, detector_version),
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
        "templates": templates,
        "distinct_templates": len(counts),
        "sample_lines": samples,
        "evidence": [dict(item) for item in verdict.evidence],
        "created_at": now_iso() if created_at is None else created_at,
    }
    if truncated:
        alert["truncated"] = truncated
    return alert


def _count_of(item: tuple[str, int]) -> int:
    return item[1]


def encode_alert(alert: dict[str, Any], max_bytes: int | None = None) -> tuple[bytes, list[str]]:
    """The document as JSON, at most `max_bytes` long (shortened as the module docstring says),
    and the parts that were shortened (empty: the document is whole).

    Raises OutputTooLarge when even the minimal document (one template, one sample line, no
    evidence, 16 characters each) exceeds `max_bytes`.
    """
    data = orjson.dumps(alert)
    if max_bytes is None or len(data) <= max_bytes:
        return data, list(alert.get("truncated", ()))
    for step in range(1, _SHRINK_STEPS + 1):
        doc = _shrunk(alert, step)
        data = orjson.dumps(doc)
        if len(data) <= max_bytes:
            return data, doc["truncated"]
    raise OutputTooLarge(f"alert {alert['alert_id']}: {len(data)} bytes even at its minimum, limit {max_bytes}")


def _shrunk(alert: dict[str, Any], step: int) -> dict[str, Any]:
    """The document with its truncatable parts halved `step` times (shorter strings, fewer items)."""
    chars = max(_MIN_CHARS, MAX_LINE_CHARS >> step)
    templates = [_clip(item, "template", chars) for item in alert["templates"][: max(1, MAX_TEMPLATES >> step)]]
    samples = [_clip(item, "line", chars) for item in alert["sample_lines"][: max(1, MAX_SAMPLE_LINES >> step)]]
    evidence = [_clip_evidence(item, chars) for item in alert["evidence"][: len(alert["evidence"]) >> step]]
    truncated = set(alert.get("truncated", ()))
    for part, items in (("templates", templates), ("sample_lines", samples), ("evidence", evidence)):
        if len(items) < len(alert[part]) or any(item.get("truncated") for item in items):
            truncated.add(part)
    doc = {**alert, "templates": templates, "sample_lines": samples, "evidence": evidence}
    doc["truncated"] = [part for part in ("templates", "sample_lines", "evidence") if part in truncated]
    return doc


def _clip_evidence(item: dict[str, Any], chars: int) -> dict[str, Any]:
    clipped = {key: value[:chars] if isinstance(value, str) else value for key, value in item.items()}
    if any(isinstance(value, str) and len(value) > chars for value in item.values()):
        clipped["truncated"] = True
    return clipped
