"""Metrics bookkeeping, readiness rules and the HTTP endpoint, without a broker."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from logstream.metrics import Health, Metrics, MetricsServer, MetricsServerError
from logstream.records import LogLine
from logstream.windows import CountWindower, SessionWindower


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def line(offset: int, t: float = 0.0, blocks: tuple[str, ...] = ()) -> LogLine:
    return LogLine("t", 0, offset, f"raw {offset}", "msg", t, None, blocks)


def test_cache_stats_become_monotonic_counters_and_a_ratio() -> None:
    metrics = Metrics()
    metrics.observe_cache_stats({"embedding": (3, 1)})
    metrics.observe_cache_stats({"embedding": (10, 2)})
    assert sample(metrics, "logstream_cache_hits_total", cache="embedding") == 10
    assert sample(metrics, "logstream_cache_misses_total", cache="embedding") == 2
    assert sample(metrics, "logstream_cache_hit_ratio", cache="embedding") == pytest.approx(10 / 12)
    # the detector reset its totals (model reloaded): counters keep growing from the new totals
    metrics.observe_cache_stats({"embedding": (1, 1)})
    assert sample(metrics, "logstream_cache_hits_total", cache="embedding") == 11
    assert sample(metrics, "logstream_cache_misses_total", cache="embedding") == 3
    assert sample(metrics, "logstream_cache_hit_ratio", cache="embedding") == pytest.approx(0.5)
    metrics.observe_cache_stats({"verdict": (0, 0)})
    assert sample(metrics, "logstream_cache_hit_ratio", cache="verdict") == 0.0


def test_forget_partition_drops_its_gauges_only() -> None:
    metrics = Metrics()
    for partition in ("0", "1"):
        metrics.consumer_lag.labels("raw", partition).set(42)
        metrics.open_windows.labels("raw", partition).set(3)
        metrics.lines_consumed.labels("raw", partition).inc(7)
    metrics.forget_partition("raw", 0)
    metrics.forget_partition("raw", 9)  # never owned: no error
    assert sample(metrics, "logstream_consumer_lag", topic="raw", partition="0") is None
    assert sample(metrics, "logstream_open_windows", topic="raw", partition="0") is None
    assert sample(metrics, "logstream_consumer_lag", topic="raw", partition="1") == 42
    assert sample(metrics, "logstream_lines_consumed_total", topic="raw", partition="0") == 7


def test_last_commit_age_counts_from_start_then_from_the_commit() -> None:
    metrics = Metrics()
    age = sample(metrics, "logstream_last_commit_age_seconds")
    assert age is not None and 0 <= age < 5
    metrics.last_commit_timestamp.set(time.time() - 120)
    age = sample(metrics, "logstream_last_commit_age_seconds")
    assert age is not None and 119 <= age < 125


def test_ready_only_when_assigned_polling_and_broker_reachable() -> None:
    health = Health()
    assert health.ready() == (False, "no partitions assigned")
    health.assigned = True
    assert health.ready() == (False, "poll loop stalled")
    health.last_poll = time.time()
    assert health.ready() == (True, "ready")
    health.broker_ok = False
    assert health.ready() == (False, "broker unreachable")
    health.broker_ok = True
    health.last_poll = time.time() - health.poll_stale_after_s - 1
    assert not health.ready()[0]


def http_status(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_endpoint_paths_and_port_conflict() -> None:
    metrics, health = Metrics(), Health()
    server = MetricsServer(metrics, health, port=0, host="127.0.0.1").start()
    try:
        assert http_status(server.port, "/healthz") == (200, b"ok\n")
        assert http_status(server.port, "/readyz") == (503, b"no partitions assigned\n")
        health.assigned, health.last_poll = True, time.time()
        assert http_status(server.port, "/readyz/") == (200, b"ready\n")
        code, body = http_status(server.port, "/metrics?name[]=x")
        assert code == 200 and b"logstream_lines_consumed" in body
        assert http_status(server.port, "/metricsfoo")[0] == 404
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{server.port}"):
            MetricsServer(metrics, health, port=server.port, host="127.0.0.1")
    finally:
        server.stop()


def test_count_windows_report_each_opening() -> None:
    windower = CountWindower("t", 0, size=4, stride=2)
    opened = [windower.add(line(i)).opened for i in range(8)]
    assert opened == [1, 0, 1, 0, 1, 0, 1, 0]


def test_session_windows_report_each_opening() -> None:
    windower = SessionWindower("t", 0, gap=10, grace=0)
    assert windower.add(line(0, 0.0, ("blk_1", "blk_2"))).opened == 2  # one line, two sessions
    assert windower.add(line(1, 1.0, ("blk_1",))).opened == 0
    assert windower.add(line(2, 30.0, ("blk_1",))).opened == 1  # the gap closed blk_1: a new session
    assert windower.add(line(3, 0.0, ("blk_3",))).opened == 0  # late: joins nothing, opens nothing
    assert windower.add(line(4, 31.0)).opened == 0  # unkeyed


def test_cached_label_children_follow_remove_and_clear() -> None:
    metrics = Metrics()
    child = metrics.consumer_lag.labels("raw", "0")
    assert metrics.consumer_lag.labels("raw", "0") is child
    assert metrics.consumer_lag.labels(topic="raw", partition="0") is child
    child.set(5)
    metrics.forget_partition("raw", 0)
    fresh = metrics.consumer_lag.labels("raw", "0")
    assert fresh is not child and sample(metrics, "logstream_consumer_lag", topic="raw", partition="0") == 0
    metrics.windows_closed.labels("count", "size").inc()
    metrics.windows_closed.clear()
    assert sample(metrics, "logstream_windows_closed_total", kind="count", reason="size") is None
    metrics.windows_closed.labels("count", "size").inc()
    assert sample(metrics, "logstream_windows_closed_total", kind="count", reason="size") == 1
