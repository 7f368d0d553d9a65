"""The scoring thread takes a consume batch's windows together and returns their verdicts in order."""

from __future__ import annotations

import threading
import time

from logstream.detectors.null import NullDetector
from logstream.records import LogLine, Verdict, Window
from logstream.scoring import ScoreJob, ScoringWorker


def window(i: int) -> Window:
    line = LogLine(topic="t", partition=0, offset=i, raw=f"line {i}", template="line <*>", event_time=float(i))
    return Window("count", "t/0", "t", 0, [line], "size")


class CountingDetector(NullDetector):
    """The null detector, remembering the size of each batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def score(self, windows: list[Window]) -> list[Verdict]:
        self.batches.append(len(windows))
        return super().score(windows)


def collect(worker: ScoringWorker, n: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    seqs: list[int] = []
    while len(seqs) < n and time.monotonic() < deadline:
        seqs += [result.job.seq for result in worker.take_results()]
        time.sleep(0.005)
    return seqs


def test_submit_many_scores_in_submission_order_in_full_batches() -> None:
    detector = CountingDetector()
    worker = ScoringWorker(detector, batch_size=16, max_wait_s=5.0)
    worker.start()
    try:
        worker.submit_many([ScoreJob(window(i), 0, i) for i in range(40)])
        worker.submit(ScoreJob(window(40), 0, 40))
        worker.submit_many([])
        worker.flush_partial(True)
        assert collect(worker, 41) == list(range(41))
        assert sum(detector.batches) == 41 and max(detector.batches) == 16
        assert detector.batches[:2] == [16, 16]  # woken once for the 40, and they were all there
    finally:
        worker.stop()


class GatedDetector(NullDetector):
    """The null detector, scoring only once the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def score(self, windows: list[Window]) -> list[Verdict]:
        self.gate.wait(10.0)
        return super().score(windows)


def test_wait_below_returns_once_the_scorer_worked_the_queue_down() -> None:
    """The poll loop's pause grace (`pipeline.PAUSE_GRACE_S`): results waiting to be collected do not count."""
    detector = GatedDetector()
    worker = ScoringWorker(detector, batch_size=4, max_wait_s=0.0)
    worker.start()
    try:
        worker.submit_many([ScoreJob(window(i), 0, i) for i in range(12)])
        assert not worker.wait_below(12, 0.1)  # the detector is stuck on its first batch: still 12 in flight
        detector.gate.set()
        assert worker.wait_below(1, 5.0)
        assert worker.in_flight == 12  # all scored, none collected yet
        assert collect(worker, 12) == list(range(12))
    finally:
        worker.stop()
