"""What logstream holds for one assigned input partition, and the committable position it yields.

Created on assign (or on a rewind), dropped on revoke or loss: the next owner rebuilds it by
replaying from the committed offset (see `checkpoint`).
"""

from __future__ import annotations

import time

from logstream.checkpoint import CommittedPosition, OutputLedger, PartitionCut
from logstream.fingerprint import WindowFingerprint
from logstream.metrics import Metrics
from logstream.publishing import Output
from logstream.records import Window
from logstream.windows import Windower

TP = tuple[str, int]


class PartitionState:
    """One partition's windowing engine, read position, replay fence and output ledger."""

    def __init__(self, tp: TP, windower: Windower, epoch: int, committed: CommittedPosition,
                 metrics: Metrics, settings: WindowFingerprint | None = None) -> None:
        self.tp = tp
        self.windower = windower
        self.settings = settings  # the window settings its cuts record
        self.epoch = epoch  # outputs and deliveries of an earlier ownership of tp are ignored
        self.position: int | None = committed.offset  # next offset to read
        self.origin: int | None = committed.offset  # where this ownership started reading
        self.fence = committed.fence  # below it, side effects were done by an earlier owner
        self.ledger = OutputLedger()
        self.held: list[Output] = []  # exactly-once: outputs issued after the pending cut
        # None also when `committed` is not what the broker holds (its fence dropped: `resume`), so the
        # first cut commits the position under the current settings whatever it is
        self.last_committed: tuple[int, int] | None = (
            (committed.offset, committed.fence) if committed.offset is not None and committed.reset is None else None
        )
        self.end_at_start: int | None = None
        self.eof = False
        self.last_line_at = time.monotonic()  # when a line last joined the windows (idle close)
        self.idle_held: list[Window] = []  # closed by an idle cut; published once the cut is committed
        # the fence its commit carries: the position at the cut, kept while the cut is held even if the
        # position moves on (a commit retried): the snapshot is the windows' state at the cut, so records
        # read after it must replay as new (at-least-once: their outputs may repeat; none is lost)
        self.idle_cut_at: int | None = None
        topic, partition = tp
        self.lines_counter = metrics.lines_consumed.labels(topic, str(partition))
        self.replay_counter = metrics.lines_replayed.labels(topic, str(partition))
        self.open_gauge = metrics.open_windows.labels(topic, str(partition))

    @property
    def caught_up(self) -> bool:
        if self.eof:
            return True
        return self.end_at_start is not None and self.position is not None and self.position >= self.end_at_start

    def cut(self) -> PartitionCut | None:
        """The committable position now (None: nothing read, or nothing new since the last commit).

        Commit offset: the oldest open window's first line (else the next offset to read); fence:
        the next offset to read. Windows held by an idle cut pull the commit offset back to their first
        line and the fence to the position when the cut was taken, so a replay from the commit reaches
        the cut's line, below the fence, and publishes them there (`windows.AddResult.cut`)."""
        if self.position is None:
            return None
        oldest = self.windower.oldest_open_offset()
        commit_offset = oldest if oldest is not None else self.position
        fence = max(self.position, self.fence)
        if self.idle_held:
            commit_offset = min(commit_offset, self.idle_held[0].first_offset)
            fence = self.idle_cut_at if self.idle_cut_at is not None else fence
        self.windower.forget_before(commit_offset)
        if self.last_committed == (commit_offset, fence) and not self.idle_held:
            return None
        return PartitionCut(commit_offset, fence, self.ledger.issued, self.windower.snapshot(), settings=self.settings)

    def idle_cut(self, now: float, idle_s: float) -> bool:
        """Close every open window of a partition read to its end and quiet for `idle_s` seconds.

        The windows are held (`idle_held`) until a commit records the cut; returns whether it cut. The
        cut's commit fences at the position now: every record read before the cut was handled (its dead
        letter, the windows it closed), so a replay repeats none of it, while the cut's line, met again
        below the fence, closes the cut's windows, published then."""
        if self.idle_held or not self.eof or not self.windower.open_windows or now - self.last_line_at < idle_s:
            return False
        held = self.windower.cut()
        if not held:
            return False
        self.idle_cut_at = self.position if self.position is not None else 0
        self.idle_held = held
        self.open_gauge.set(self.windower.open_windows)
        return True

    def release_idle(self) -> list[Window]:
        """The idle cut's windows, once a commit recorded the cut."""
        held, self.idle_held, self.idle_cut_at = self.idle_held, [], None
        return held

    def restart_log(self, offset: int, windower: Windower) -> list[Window]:
        """The log went back: a record at `offset`, below the position, came (the client reset its offset
        after the topic was recreated or the log truncated). Every record from `offset` on is new.

        Fence, position and origin go to `offset`, and `windower` (fresh) replaces the old one. The old
        log's windows are returned to be judged, for their lines were read and no replay can bring them
        back: those an idle cut held (until its commit, which now would name the old log's offsets) and
        those still open, closed as the old log's end (reason end_of_input). The ledger stays: outputs
        in flight are still this ownership's."""
        windows = self.idle_held + self.windower.flush()
        self.idle_held, self.idle_cut_at = [], None
        self.windower = windower
        self.fence = self.position = self.origin = offset
        self.last_committed = None  # the broker holds the old log's position: commit the new one whatever it is
        self.open_gauge.set(0)
        return windows
