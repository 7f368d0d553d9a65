"""Noticing a partition whose records mostly go to the dead-letter topic (a wrong --format looks healthy).

Each partition counts the records it read and the ones it dead-lettered since the last evaluation.
Every few seconds (and at the end of the input) a partition with enough records gets its share
exported as `logstream_dead_letter_ratio{topic,partition}`; when most of them were dead-lettered, a
rate-limited warning names the partition, the format, the reasons and one example, with a hint.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from logstream.logs import LogThrottle, get_logger
from logstream.metrics import Metrics

log = get_logger(__name__)

TP = tuple[str, int]
MIN_RECORDS = 100  # fewer records since the last evaluation: wait for more (except at the end of input)
WARN_SHARE = 0.5  # "most records"
WARN_INTERVAL_S = 60.0  # at most one warning per partition this often

HINTS = {
    "unparseable": "the lines do not look like --format {format}: is it the format of this topic?",
    "unkeyed": "session windows need a block id (blk_...) in each line: use --window count for logs without one",
    "late": "lines arrive after their session closed: raise --session-grace or --session-gap",
    "undecodable": "the records are not UTF-8 text",
    "control_characters": "the records carry control characters (binary data?)",
    "too_large": "the records are longer than --max-line-bytes",
    "empty": "the records are empty",
    "parser_error": "logstream's parser failed on these records (a fault of ours: please report it, with a record)",
}


@dataclass
class _Share:
    read: int = 0
    dead: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    example: dict[str, object] | None = None


class DeadLetterWatch:
    """Per-partition share of dead-lettered records, exported and warned about."""

    def __init__(self, metrics: Metrics, fmt: str, window: str, throttle: LogThrottle | None = None) -> None:
        self.metrics = metrics
        self.format = fmt
        self.window = window
        self._shares: dict[TP, _Share] = {}
        self._throttle = throttle or LogThrottle(WARN_INTERVAL_S)

    def read(self, tp: TP, records: int) -> None:
        """`records` more were read from `tp` (called once per consumed batch)."""
        share = self._shares.get(tp)
        if share is None:
            share = self._shares[tp] = _Share()
        share.read += records

    def dead(self, tp: TP, reason: str, detail: str, offset: int) -> None:
        share = self._shares.get(tp)
        if share is None:
            share = self._shares[tp] = _Share()
        share.dead += 1
        share.reasons[reason] += 1
        if share.example is None:
            share.example = {"reason": reason, "detail": detail[:200], "offset": offset}

    def forget(self, tp: TP) -> None:
        self._shares.pop(tp, None)

    def evaluate(self, final: bool = False) -> None:
        """Export and judge every partition with enough records (any at all when `final`), then start over."""
        for tp, share in self._shares.items():
            if share.read == 0 or (share.read < MIN_RECORDS and not final):
                continue
            ratio = min(1.0, share.dead / share.read)
            self.metrics.dead_letter_ratio.labels(tp[0], str(tp[1])).set(ratio)
            if ratio >= WARN_SHARE:
                self._warn(tp, share, ratio)
            self._shares[tp] = _Share()

    def _warn(self, tp: TP, share: _Share, ratio: float) -> None:
        suppressed = self._throttle.allow(f"{tp[0]}/{tp[1]}", time.monotonic())
        if suppressed is None:
            return
        reason = share.reasons.most_common(1)[0][0] if share.reasons else "unparseable"
        log.warning(
            "most_records_dead_lettered",
            partition=f"{tp[0]}/{tp[1]}",
            share=round(ratio, 3),
            records=share.read,
            dead_lettered=dict(share.reasons),
            format=self.format,
            window=self.window,
            example=share.example,
            hint=HINTS.get(reason, "see the dead-letter topic (`logstream dlq`)").format(format=self.format),
            warnings_suppressed_since_last=suppressed,
        )
