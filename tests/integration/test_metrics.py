"""The /metrics, /healthz and /readyz endpoint, scraped while a real consumer runs against the broker.

The expected numbers come from the input itself: lines sent per partition, bad records per reason,
count windows per partition, and each closed window judged by the same detector outside Kafka. The
scraped counters must equal them, and the alerts read back from the topic must agree too.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from logstream.alerts import severity
from logstream.broker import EmbeddedBroker
from logstream.detectors.novelty import NoveltyDetector
from logstream.metrics import Health, Metrics, MetricsServer
from logstream.parsing import LineParser
from logstream.pipeline import Pipeline
from logstream.records import Verdict, Window
from logstream.windows import CountWindower
from tests.kafkatools import SAMPLES, create_topic, make_settings, produce_lines, read_alerts, unique

MODEL = SAMPLES / "bgl-novelty.json"
WINDOW = 100

# One bad record per dead-letter reason the parser can give, each with the reason it must be counted under.
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"\xff\xfe not utf-8", "undecodable"),
    (b"this is not a BGL line", "unparseable"),
    (b"- 1117838570 2005.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO bell \x07",
     "control_characters"),
    (b"- notatime 2005.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO bad epoch", "unparseable"),
]


class CachingNovelty(NoveltyDetector):
    """The novelty detector with a verdict cache keyed by the window's templates, reporting its hit rate.

    A real cache (identical windows are judged once), so the pipeline's cache metrics have real numbers
    to export; `cache_stats` is the optional detector hook the pipeline reads after each batch.
    """

    def __init__(self, known: NoveltyDetector) -> None:
        super().__init__(known.known, source=known.source, lines=known.lines)
        self._verdicts: dict[tuple[str, ...], Verdict] = {}
        self.hits = self.misses = 0

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        verdicts = []
        for window in windows:
            key = tuple(window.templates)
            verdict = self._verdicts.get(key)
            if verdict is None:
                self.misses += 1
                verdict = self._verdicts[key] = self.judge(window)
            else:
                self.hits += 1
            verdicts.append(verdict)
        return verdicts

    def cache_stats(self) -> dict[str, tuple[int, int]]:
        return {"verdict": (self.hits, self.misses)}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name and v}


def caught_up(samples: Samples) -> bool:
    """Both partitions report a lag of 0 (the gauge is refreshed every 5 s) and a commit was taken."""
    lags = {dict(labels)["partition"]: v for (name, labels), v in samples.items()
            if name == "logstream_consumer_lag"}
    return lags == {"0": 0.0, "1": 0.0} and value(samples, "logstream_commits_total") > 0


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def bgl_lines(count: int) -> list[bytes]:
    lines = (SAMPLES / "BGL_2k.log").read_bytes().splitlines()
    assert len(lines) >= count
    return lines[:count]


def expected_windows(lines: list[bytes], topic: str, partition: int, first_offset: int) -> list[Window]:
    """The count windows closed by size when `lines` sit at consecutive offsets from `first_offset`."""
    parser, windower, closed = LineParser("bgl"), CountWindower(topic, partition, WINDOW), []
    for i, raw in enumerate(lines):
        line = parser.parse(raw, topic=topic, partition=partition, offset=first_offset + i, record_time=0.0)
        closed.extend(windower.add(line).closed)
    return closed


def test_scraped_counters_match_what_was_sent(broker: EmbeddedBroker, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap_servers
    topic = unique("metrics")
    create_topic(bootstrap, topic, partitions=2)
    good = bgl_lines(620)
    # partition 0: 350 good lines with every bad record in front; partition 1: 270 good lines
    part0_good, part1_good = good[:350], good[350:]
    part0 = [raw for raw, _ in BAD_RECORDS] + part0_good
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=WINDOW,
                             detector="novelty", model=MODEL, emit="all", batch_size=2)
    detector = CachingNovelty(NoveltyDetector.load(MODEL))

    metrics, health, stop = Metrics(), Health(), threading.Event()
    pipeline = Pipeline(settings, detector, metrics=metrics, health=health, stop_event=stop)
    server = MetricsServer(metrics, health, port=0, host="127.0.0.1").start()
    thread = threading.Thread(target=pipeline.run, name="pipeline-under-test", daemon=True)
    try:
        port = server.port
        assert status(port, "/healthz") == 200
        assert status(port, "/readyz") == 503, "ready before any partition was assigned"
        assert status(port, "/nope") == 404

        thread.start()
        wait_for(lambda: status(port, "/readyz") == 200, 30, "/readyz to turn 200 after assignment")
        assert health.assigned

        produce_lines(bootstrap, topic, part0, partition=0)
        produce_lines(bootstrap, topic, part1_good, partition=1)
        sent = len(part0) + len(part1_good)

        closed = (expected_windows(part0_good, topic, 0, len(BAD_RECORDS))
                  + expected_windows(part1_good, topic, 1, 0))
        assert len(closed) == 3 + 2
        wait_for(lambda: sum(by_label(scrape(port), "logstream_alerts_published_total", "severity").values())
                 >= len(closed), 60, "every closed window's verdict to be published")
        # the lag gauge is refreshed every 5 s; the commit follows the acknowledgements
        wait_for(lambda: caught_up(scrape(port)), 30, "both partitions at lag 0 and a commit")
        samples = scrape(port)
    finally:
        stop.set()
        thread.join(60)
        server.stop()
    assert not thread.is_alive()

    # lines per topic/partition: every record, good or bad
    assert value(samples, "logstream_lines_consumed_total", topic=topic, partition="0") == len(part0)
    assert value(samples, "logstream_lines_consumed_total", topic=topic, partition="1") == len(part1_good)
    assert sum(by_label(samples, "logstream_lines_consumed_total", "partition").values()) == sent

    # bad input: parse errors and dead-letter records by reason
    bad_by_reason = Counter(reason for _, reason in BAD_RECORDS)
    assert by_label(samples, "logstream_parse_errors_total", "reason") == bad_by_reason
    assert by_label(samples, "logstream_dlq_records_total", "reason") == bad_by_reason

    # windows: 4 + 3 opened, 3 + 2 closed by size, one open per partition (50 and 70 lines)
    assert value(samples, "logstream_windows_opened_total", kind="count") == 7
    assert value(samples, "logstream_windows_closed_total", kind="count", reason="size") == len(closed)
    assert value(samples, "logstream_open_windows", topic=topic, partition="0") == 1
    assert value(samples, "logstream_open_windows", topic=topic, partition="1") == 1
    assert value(samples, "logstream_late_lines_total") == 0

    # alerts by severity: as judged directly, and as found on the alerts topic
    judged = Counter(severity(NoveltyDetector.load(MODEL).judge(window)) for window in closed)
    assert by_label(samples, "logstream_alerts_published_total", "severity") == judged
    published = read_alerts(bootstrap, settings.alerts_topic)
    assert Counter(alert["verdict"]["severity"] for alert in published) == judged
    assert len(judged) >= 2, "the sample should give both normal and anomalous windows"

    # scoring: batches of at most 2 windows, one latency observation per batch
    batches = value(samples, "logstream_batch_size_count")
    assert value(samples, "logstream_batch_size_sum") == len(closed)
    assert len(closed) / 2 <= batches <= len(closed)
    assert value(samples, "logstream_scoring_seconds_count") == batches
    assert value(samples, "logstream_scoring_errors_total") == 0

    # the detector's verdict cache: every window is one lookup
    hits = value(samples, "logstream_cache_hits_total", cache="verdict")
    misses = value(samples, "logstream_cache_misses_total", cache="verdict")
    assert (hits, misses) == (detector.hits, detector.misses)
    assert hits + misses == len(closed)
    assert value(samples, "logstream_cache_hit_ratio", cache="verdict") == pytest.approx(hits / len(closed))

    # flow control and commits
    assert value(samples, "logstream_queue_depth") == 0
    assert value(samples, "logstream_paused_partitions") == 0
    assert value(samples, "logstream_assigned_partitions") == 2
    assert 0 <= value(samples, "logstream_last_commit_age_seconds") < 30
    assert value(samples, "logstream_last_commit_timestamp_seconds") > time.time() - 60
