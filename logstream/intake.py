"""How many records the poll loop asks the consumer for in one call (`ConsumeSizer`)."""

from __future__ import annotations


class ConsumeSizer:
    """Sizes each consume call: as many records as are likely to close the windows there is room for.

    A record closes a window every `stride` lines with count windows, about one in seven HDFS lines
    with session windows; the sizer learns that rate from the batches handled (a moving average of
    windows closed per record, starting at one window per record: the bound before anything is known)
    and asks for `room / rate` records, between 1 and `most`. Larger batches make the vectorized
    parse cheaper per line; the rate keeps the windows they close near the room left. A `--once` run
    that knows how many records are left asks for no more than those, so its last call returns when
    they are there rather than at its timeout.
    """

    SMOOTHING = 0.2  # weight of the newest batch in the moving average

    def __init__(self, most: int) -> None:
        if most < 1:
            raise ValueError(f"most must be at least 1, got {most}")
        self.most = most
        self.rate = 1.0  # windows closed per record, smoothed

    def records(self, room: int, remaining: int | None = None) -> int:
        """Records to ask for; `room`: windows that may still be queued (may be negative); `remaining`:
        records left in a run that stops at the end (None: unknown or unbounded)."""
        wanted = int(max(1, room) / self.rate)
        if remaining is not None:
            wanted = min(wanted, remaining)
        return max(1, min(self.most, wanted))

    def observe(self, records: int, windows: int) -> None:
        """A handled batch of `records` records closed `windows` windows."""
        if records <= 0:
            return
        observed = max(windows / records, 1.0 / self.most)
        self.rate += self.SMOOTHING * (observed - self.rate)
