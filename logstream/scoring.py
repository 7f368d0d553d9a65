"""The scoring thread: batches closed windows, runs the detector off the poll thread, returns verdicts.

The poll loop submits jobs without blocking and collects results each iteration; it pauses the
partitions when `in_flight` reaches the queue bound (backpressure), so a slow detector never stops
the consumer from polling. Jobs are scored in submission order. A detector error on a batch is
retried window by window; a window that still fails comes back as an error result (the pipeline
sends it to the dead-letter topic) rather than stalling the stream.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from logstream.coverage import CoverageMonitor
from logstream.detectors.base import Detector
from logstream.logs import get_logger
from logstream.records import Verdict, Window

log = get_logger(__name__)


@dataclass(slots=True)
class ScoreJob:
    window: Window
    epoch: int  # assignment epoch of the partition when the window closed (stale results are dropped)
    seq: int  # output sequence number in the partition's ledger


@dataclass(slots=True)
class ScoreResult:
    job: ScoreJob
    verdict: Verdict | None
    error: str | None = None


BatchObserver = Callable[[int, float], None]


class ScoringWorker:
    """One background thread that owns the detector's `score` calls."""

    def __init__(
        self,
        detector: Detector,
        *,
        batch_size: int,
        max_wait_s: float,
        on_batch: BatchObserver | None = None,
        coverage: CoverageMonitor | None = None,
    ) -> None:
        self.detector = detector
        self.coverage = coverage  # sees every scored batch's windows (unseen-template share)
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: deque[ScoreJob] = deque()
        self._results: deque[ScoreResult] = deque()
        self._scoring = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._flush_partial = False
        self._thread = threading.Thread(target=self._run, name="logstream-scorer", daemon=True)

    # --- poll-thread side (never blocks for long) --------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: ScoreJob) -> None:
        self.submit_many((job,))

    def submit_many(self, jobs: Sequence[ScoreJob]) -> None:
        """Queue jobs in order, under one lock and with at most one wake-up of the scorer.

        The scorer is woken only when it can act: it waits for a first job, then for a full batch
        (or its deadline). Waking it per job costs a thread switch per window; a consume batch that
        closes many windows (session windows) submits them together."""
        if not jobs:
            return
        with self._cond:
            before = len(self._queue)
            self._queue.extend(jobs)
            if before == 0 or before < self.batch_size <= len(self._queue):
                self._cond.notify_all()

    def take_results(self) -> list[ScoreResult]:
        with self._cond:
            results = list(self._results)
            self._results.clear()
        return results

    def drop(self, keep: Callable[[ScoreJob], bool]) -> int:
        """Remove queued (not yet scoring) jobs for which `keep` is false; returns how many."""
        with self._cond:
            before = len(self._queue)
            self._queue = deque(job for job in self._queue if keep(job))
            return before - len(self._queue)

    @property
    def in_flight(self) -> int:
        """Jobs queued, being scored, or scored but not yet collected."""
        with self._cond:
            return len(self._queue) + self._scoring + len(self._results)

    def wait_below(self, limit: int, timeout: float) -> bool:
        """Block until fewer than `limit` jobs are queued or being scored (at most `timeout` seconds).

        Results waiting to be collected do not count: the caller collects them next. Returns whether
        the queue got below `limit` in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._queue) + self._scoring >= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush_partial(self, enabled: bool) -> None:
        """Score partial batches at once (end of input, shutdown) instead of waiting for more."""
        with self._cond:
            self._flush_partial = enabled
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or scoring (results may still wait to be collected)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._scoring:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- scoring thread -----------------------------------------------------------------------

    def _next_batch(self) -> list[ScoreJob] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait(0.5)
            if self._stopping:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._queue) < self.batch_size and not self._stopping and not self._flush_partial:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._scoring = len(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            results = self._score(batch)
            elapsed = time.perf_counter() - started
            if self.coverage is not None:
                self.coverage.observe([job.window for job in batch])
            with self._cond:
                self._results.extend(results)
                self._scoring = 0
                self._cond.notify_all()
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)

    def _score(self, batch: list[ScoreJob]) -> list[ScoreResult]:
        try:
            verdicts = self.detector.score([job.window for job in batch])
            if len(verdicts) != len(batch):
                raise RuntimeError(f"detector returned {len(verdicts)} verdicts for {len(batch)} windows")
            return [ScoreResult(job, verdict) for job, verdict in zip(batch, verdicts)]
        except Exception as exc:  # a detector bug or a transient device error: isolate the bad window
            log.error("scoring_batch_failed", error=repr(exc), windows=len(batch))
            if len(batch) == 1:
                return [ScoreResult(batch[0], None, "".join(traceback.format_exception_only(exc)).strip())]
            return [result for job in batch for result in self._score([job])]
