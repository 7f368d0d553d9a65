"""Prometheus metrics and the /metrics, /healthz, /readyz endpoint of one logstream process.

Each `Metrics` owns its registry (no process-global collectors), so tests can run several
pipelines in one process. `Health` is what the poll loop reports about itself; /readyz is ready
only while partitions are assigned, the loop has polled recently and the broker answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _LabelCache:
    """`labels()` served from a plain dict once a child exists.

    The poll loop asks for a labelled child per window (closed, published, opened); the library's
    `labels()` validates and takes a lock every time. Children are only ever added, except through
    `remove`/`clear`, which empty this cache too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._children: dict[tuple[object, ...], Any] = {}
        super().__init__(*args, **kwargs)

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Any:
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
        child = self._children.get(labelvalues)
        if child is None:
            child = self._children[labelvalues] = super().labels(*labelvalues)  # type: ignore[misc]
        return child

    def remove(self, *labelvalues: Any) -> None:
        self._children.clear()
        super().remove(*labelvalues)  # type: ignore[misc]

    def clear(self) -> None:
        self._children.clear()
        super().clear()  # type: ignore[misc]


class _Counter(_LabelCache, Counter):
    pass


class _Gauge(_LabelCache, Gauge):
    pass


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TEXT = "text/plain; charset=utf-8"


class Metrics:
    """Every counter and gauge the pipeline updates; names are prefixed `logstream_`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        tp = ["topic", "partition"]
        # input
        self.lines_consumed = _Counter("logstream_lines_consumed", "Records consumed from input topics", tp,
                                       registry=r)
        self.lines_replayed = _Counter("logstream_lines_replayed",
                                       "Records re-read below a replay fence after a restart or rebalance",
                                       tp, registry=r)
        self.parse_errors = _Counter("logstream_parse_errors", "Records that could not be parsed",
                                     ["reason"], registry=r)
        self.dlq_records = _Counter("logstream_dlq_records", "Records sent to the dead-letter topic",
                                    ["reason"], registry=r)
        self.dead_letter_ratio = _Gauge("logstream_dead_letter_ratio",
                                        "Share of the records recently read from the partition that were "
                                        "dead-lettered (near 1: wrong --format or window kind)", tp, registry=r)
        # windows
        self.windows_opened = _Counter("logstream_windows_opened", "Windows opened", ["kind"], registry=r)
        self.windows_closed = _Counter("logstream_windows_closed", "Windows closed", ["kind", "reason"],
                                       registry=r)
        self.late_lines = _Counter("logstream_late_lines",
                                   "Line/window pairs that arrived after the window closed", registry=r)
        self.open_windows = _Gauge("logstream_open_windows", "Open windows", tp, registry=r)
        self.outputs_truncated = _Counter("logstream_outputs_truncated",
                                          "Outputs shortened to fit the output size limits, by kind: alert or "
                                          "dead_letter", ["kind"], registry=r)
        self.future_lines = _Counter("logstream_future_lines",
                                     "Lines too far ahead of their partition's stream time (--max-future-s), "
                                     "by what was done: dead-letter or clamp", ["action"], registry=r)
        # scoring and flow control
        self.queue_depth = _Gauge("logstream_queue_depth", "Windows waiting for or in scoring", registry=r)
        self.paused_partitions = _Gauge("logstream_paused_partitions", "Partitions paused by backpressure",
                                        registry=r)
        self.batch_size = Histogram("logstream_batch_size", "Windows per scoring batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.scoring_seconds = Histogram("logstream_scoring_seconds", "Detector time per batch",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.scoring_errors = _Counter("logstream_scoring_errors", "Windows the detector failed on",
                                       registry=r)
        self.cache_hits = _Counter("logstream_cache_hits", "Detector cache hits", ["cache"], registry=r)
        self.cache_misses = _Counter("logstream_cache_misses", "Detector cache misses", ["cache"],
                                     registry=r)
        self.cache_hit_ratio = _Gauge("logstream_cache_hit_ratio", "Detector cache hit ratio since start",
                                      ["cache"], registry=r)
        # traffic against what the detector was trained on (logstream.coverage)
        self.unseen_template_share = _Gauge(
            "logstream_unseen_template_share",
            "Share of recently judged lines whose template the detector's training data never held", registry=r)
        self.unseen_template_trained_share = _Gauge(
            "logstream_unseen_template_trained_share",
            "The same share on held-out data at training time (recorded in the artifact)", registry=r)
        self.unseen_template_alarm_share = _Gauge(
            "logstream_unseen_template_alarm_share",
            "unseen_template_share above which logstream warns (derived from the trained share)", registry=r)
        self.unseen_template_warnings = _Counter(
            "logstream_unseen_template_warnings",
            "Warnings that the traffic is mostly templates the detector never saw", registry=r)
        # output, offsets, group
        self.alerts_published = _Counter("logstream_alerts_published", "Verdicts published", ["severity"],
                                         registry=r)
        self.verdicts = _Counter("logstream_verdicts", "Windows judged by the detector", ["label"], registry=r)
        self.consumer_lag = _Gauge("logstream_consumer_lag", "High watermark minus position", tp, registry=r)
        self.commits = _Counter("logstream_commits", "Offset commits (or committed transactions)", registry=r)
        self.last_commit_timestamp = _Gauge("logstream_last_commit_timestamp_seconds",
                                            "Unix time of the last successful commit", registry=r)
        self.last_commit_age = _Gauge("logstream_last_commit_age_seconds",
                                      "Seconds since the last successful commit (or since start)",
                                      registry=r)
        self.last_commit_age.set_function(self._commit_age)
        self.assigned_partitions = _Gauge("logstream_assigned_partitions", "Partitions assigned", registry=r)
        self.rebalances = _Counter("logstream_rebalances", "Partition assignment changes", ["kind"],
                                   registry=r)
        self._started = time.time()
        self._cache_seen: dict[str, tuple[int, int]] = {}
        self._cache_lock = threading.Lock()

    def observe_cache_stats(self, stats: Mapping[str, tuple[int, int]]) -> None:
        """Turn a detector's cumulative (hits, misses) per cache into counters and a since-start ratio.

        Detectors report running totals; Prometheus counters must only grow, so the increase since the
        previous report is added. A total that went down means the detector reset its statistics (a
        reloaded model): the new totals count from zero.
        """
        with self._cache_lock:
            for cache, (hits, misses) in stats.items():
                seen_hits, seen_misses = self._cache_seen.get(cache, (0, 0))
                if hits < seen_hits or misses < seen_misses:
                    seen_hits = seen_misses = 0
                self.cache_hits.labels(cache).inc(hits - seen_hits)
                self.cache_misses.labels(cache).inc(misses - seen_misses)
                self._cache_seen[cache] = (hits, misses)
                total = hits + misses
                self.cache_hit_ratio.labels(cache).set(hits / total if total else 0.0)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the per-partition gauges of a partition this process no longer owns.

        A stale lag or open-window value left behind after a rebalance would be summed with the new
        owner's and mislead the autoscaler; counters stay (they are totals of what this process did).
        """
        for gauge in (self.consumer_lag, self.open_windows, self.dead_letter_ratio):
            try:
                gauge.remove(topic, str(partition))
            except KeyError:
                pass

    def summary(self) -> dict[str, Any]:
        """What this process did, from its counters: the `run_summary` log line of a run.

        records_read (replays included), records_replayed, records_parsed, dead_lettered by reason,
        windows_closed (and by reason), verdicts by label (plus scoring errors) and alerts by severity
        (verdicts published as anomalous).
        """
        read = sum(_totals(self.lines_consumed).values())
        closed_by_reason: dict[str, int] = {}
        for (_kind, reason), n in _totals(self.windows_closed).items():
            closed_by_reason[reason] = closed_by_reason.get(reason, 0) + n
        return {
            "records_read": read,
            "records_replayed": sum(_totals(self.lines_replayed).values()),
            "records_parsed": read - sum(_totals(self.parse_errors).values()),
            "dead_lettered": {labels[0]: n for labels, n in _totals(self.dlq_records).items()},
            "windows_closed": sum(closed_by_reason.values()),
            "windows_closed_by_reason": closed_by_reason,
            "verdicts": {labels[0]: n for labels, n in _totals(self.verdicts).items()},
            "scoring_errors": sum(_totals(self.scoring_errors).values()),
            "alerts": {labels[0]: n for labels, n in _totals(self.alerts_published).items() if labels[0] != "none"},
        }

    def _commit_age(self) -> float:
        last = self.last_commit_timestamp.collect()[0].samples[0].value
        return max(0.0, time.time() - (last or self._started))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _totals(counter: Counter) -> dict[tuple[str, ...], int]:
    """A counter's value per label combination (label values in declaration order)."""
    totals: dict[tuple[str, ...], int] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = tuple(sample.labels.values())
                totals[key] = totals.get(key, 0) + int(sample.value)
    return totals


@dataclass
class Health:
    """Liveness/readiness facts the poll loop keeps current."""

    started: float = field(default_factory=time.time)
    assigned: bool = False
    last_poll: float = 0.0
    broker_ok: bool = True
    poll_stale_after_s: float = 30.0
    waiting_for: str | None = None  # why no partition came within the assignment timeout (the group's view)

    def ready(self) -> tuple[bool, str]:
        if not self.assigned:
            return False, "no partitions assigned" + (f": {self.waiting_for}" if self.waiting_for else "")
        if time.time() - self.last_poll > self.poll_stale_after_s:
            return False, "poll loop stalled"
        if not self.broker_ok:
            return False, "broker unreachable"
        return True, "ready"


class MetricsServerError(OSError):
    """The metrics port cannot be bound (in use, privileged); the message names host and port."""


class MetricsServer:
    """A small HTTP server on its own thread: /metrics, /healthz, /readyz.

    Port 0 binds a free port (tests); `port` tells which one was bound.
    """

    def __init__(self, metrics: Metrics, health: Health, port: int, host: str = "0.0.0.0") -> None:
        self.metrics, self.health = metrics, health
        handler = self._handler()
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise MetricsServerError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="logstream-metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        metrics, health = self.metrics, self.health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = urlsplit(self.path).path.rstrip("/") or "/"
                if path == "/metrics":
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, why = health.ready()
                    self._send(200 if ok else 503, (why + "\n").encode())
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, status: int, body: bytes, content_type: str = _TEXT) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence access logs
                return None

        return Handler
