"""Closed windows through `Pipeline._submit`, the scorer and `Publisher.publish_results` a batch at a time.

The per-batch shortcuts (windows closed counted per (kind, reason), sequence numbers issued together,
normal verdicts under --emit anomalous completed without an output) must leave what per-window
handling leaves: every sequence number issued once, in order; normal windows done, alerts and
detector errors published, results of a partition moved since dropped; the counters by label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import generate_latest

from logstream.checkpoint import CommittedPosition, OutputLedger
from logstream.detectors.null import NullDetector
from logstream.metrics import Metrics
from logstream.partitions import PartitionState
from logstream.pipeline import Pipeline
from logstream.records import LogLine, Verdict, Window
from logstream.settings import Settings
from logstream.windows import SessionWindower


class EveryThirdAnomalous(NullDetector):
    """Window i of a run is anomalous when i % 3 == 2; a window keyed `bad` fails the detector."""

    name = "third"

    def score(self, windows: Sequence[Window]) -> list[Verdict]:
        if any(window.key == "bad" for window in windows):
            raise RuntimeError("cannot score bad")
        return [Verdict(anomalous=window.first_offset % 3 == 2, score=90.0 if window.first_offset % 3 == 2 else 1.0)
                for window in windows]


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **_: Any) -> None:
        self.sent.append((topic, key))

    def poll(self, _timeout: float) -> int:
        return 0


def window(offset: int, reason: str, key: str | None = None) -> Window:
    line = LogLine("raw", 0, offset, f"line {offset}", "line <*>", float(offset), block_ids=(f"blk_{offset}",))
    return Window("session", key or f"blk_{offset}", "raw", 0, [line], reason)  # type: ignore[arg-type]


def counters(metrics: Metrics) -> list[str]:
    wanted = ("logstream_windows_closed_total", "logstream_verdicts_total", "logstream_alerts_published_total",
              "logstream_scoring_errors_total", "logstream_dlq_records_total")
    return sorted(line for line in generate_latest(metrics.registry).decode().splitlines() if line.startswith(wanted))


@pytest.mark.parametrize("emit", ["anomalous", "all"])
def test_a_scoring_batch_completes_publishes_and_counts_as_window_by_window(emit: str) -> None:
    settings = Settings(input_topic=["raw"], format="hdfs", window="session", emit=emit, batch_size=4,
                        bootstrap_servers="localhost:1")
    metrics = Metrics()
    pipeline = Pipeline(settings, EveryThirdAnomalous(), metrics=metrics)
    producer = RecordingProducer()
    pipeline.policy.producer = producer  # type: ignore[assignment]
    state = PartitionState(("raw", 0), SessionWindower("raw", 0), 1, CommittedPosition(0, 0, None), metrics)
    pipeline.parts[("raw", 0)] = state
    reasons = ["gap", "gap", "max_size", "cap", "gap", "end_of_input", "gap", "gap", "max_size"]
    pipeline._submit(state, [window(i, reason) for i, reason in enumerate(reasons)])
    pipeline._submit(state, [window(9, "gap", key="bad"), window(10, "gap")])
    assert state.ledger.issued == 11
    stale = window(11, "gap")
    pipeline._submit(state, [stale])
    stale_job = pipeline.scorer._queue[-1]
    stale_job.epoch = 0  # closed under an earlier ownership: its result is dropped, its seq never completed
    queue = pipeline.scorer._queue
    while queue:
        batch = [queue.popleft() for _ in range(min(4, len(queue)))]
        pipeline.publisher.publish_results(pipeline.scorer._score(batch))

    anomalous = [i for i in range(11) if i % 3 == 2 and i != 9]  # window 9 failed the detector
    normal = [i for i in range(11) if i % 3 != 2 and i != 9]
    alerts = [("logstream.alerts", f"blk_{i}".encode()) for i in (anomalous if emit == "anomalous" else range(11))
              if i != 9]
    assert [sent for sent in producer.sent if sent[0] == settings.alerts_topic] == \
        [(settings.alerts_topic, key) for _, key in alerts]
    assert [sent for sent in producer.sent if sent[0] == settings.dlq_topic] == [(settings.dlq_topic, b"bad")]
    if emit == "anomalous":  # normal windows done at once; the published ones wait for their deliveries
        assert state.ledger.done_through == 2 and state.ledger.outstanding == 12 - len(normal)
    else:
        assert state.ledger.done_through == 0 and state.ledger.outstanding == 12
    closed = {"gap": 8, "max_size": 2, "cap": 1, "end_of_input": 1}
    assert counters(metrics) == sorted(
        [f'logstream_windows_closed_total{{kind="session",reason="{r}"}} {float(n)}' for r, n in closed.items()]
        + [f'logstream_verdicts_total{{label="anomalous"}} {float(len(anomalous))}',
           f'logstream_verdicts_total{{label="normal"}} {float(len(normal))}',
           f'logstream_alerts_published_total{{severity="critical"}} {float(len(anomalous))}',
           'logstream_scoring_errors_total 1.0', 'logstream_dlq_records_total{reason="detector_error"} 1.0']
        + ([f'logstream_alerts_published_total{{severity="none"}} {float(len(normal))}'] if emit == "all" else []))


def test_issue_many_gives_what_issue_gives() -> None:
    one, many = OutputLedger(), OutputLedger()
    expected = [one.issue() for _ in range(3)] + [one.issue() for _ in range(0)] + [one.issue() for _ in range(5)]
    assert [*many.issue_many(3), *many.issue_many(0), *many.issue_many(5)] == expected
    assert many.issued == one.issued == 8
