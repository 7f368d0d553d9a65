"""Whether a committed position can be resumed as committed, or its fence and snapshot must go.

A commit's fence F says "the lines below F were handled: a replay from the commit offset C repeats
none of their side effects", and its snapshot rebuilds the windows that were open (`checkpoint`).
Both are true only of the log and the settings they were written for. A new owner of a partition
(an assignment, or an exactly-once rewind) therefore checks, before it trusts them:

  - the log: a committed offset above the partition's end offset (high watermark) means the topic
    was deleted and created again, or the log was truncated (an unclean leader election): the
    offsets name other records now. The owner starts from the earliest offset, with no fence and no
    snapshot, so every record of the new log is judged (`committed_offset_beyond_end`).
  - the settings: a commit whose window-settings fingerprint (`fingerprint.window_fingerprint`) is
    not the current one was made with another window size, kind, format, gap ... Replayed under the
    current settings from C, the windows closing below F are not those that were published, and the
    fence would suppress them unjudged. The owner replays from C with no fence (fence = C) and no
    snapshot: every line from C is judged again under the new settings; lines between C and F may
    be judged twice (a window overlapping one already published, a session cut in two), the cost of
    changing window settings on a live group (`window_settings_changed`). A commit without a
    fingerprint (an older logstream) is taken as matching.

The topic id of KIP-516 would tell a recreated topic from the same one even when the new log has
grown past the committed offset; the embedded broker (noida-db 0.2.3) answers every topic id with
zeros (`AdminClient.describe_topics`), so logstream relies on the offsets alone: a topic recreated and
refilled past the committed offset before the group comes back is not detected. The running consumer
also watches for the client resetting its position backwards (`ingest`, `offset_reset`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from logstream.checkpoint import CommittedPosition
from logstream.fingerprint import WindowFingerprint
from logstream.logs import get_logger

log = get_logger(__name__)

BEYOND_END = "committed_offset_beyond_end"
SETTINGS_CHANGED = "window_settings_changed"


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a new owner starts: `position` (fence and snapshot dropped when `reason` says why), and
    `seek`, the offset the consumer must be told to start at (None: the committed offset it fetches itself)."""

    position: CommittedPosition
    seek: int | None = None
    reason: str | None = None


def resume_position(committed: CommittedPosition, current: WindowFingerprint | None,
                    bounds: tuple[int, int] | None) -> Resume:
    """How to resume from `committed`, given the current window settings (None: no windows, nothing to
    compare) and the partition's (low, high) watermarks (None: unknown, the log is not checked).

    A committed offset above `high` wins over a settings change: the log starts afresh anyway."""
    if committed.offset is None:
        return Resume(committed)
    if bounds is not None and committed.offset > bounds[1]:
        low = bounds[0]
        return Resume(CommittedPosition(low, low, None, reset=BEYOND_END), seek=low, reason=BEYOND_END)
    if current is not None and committed.settings_id is not None and committed.settings_id != current.digest:
        dropped = replace(committed, fence=committed.offset, snapshot=None, state_refs=(), reset=SETTINGS_CHANGED)
        return Resume(dropped, reason=SETTINGS_CHANGED)
    return Resume(committed)


def warn(tp: tuple[str, int], committed: CommittedPosition, resume: Resume, current: WindowFingerprint | None,
         bounds: tuple[int, int] | None) -> None:
    """One warning saying why `resume` drops what `committed` carried, and what follows (nothing when it does not)."""
    partition = f"{tp[0]}/{tp[1]}"
    if resume.reason == BEYOND_END:
        assert bounds is not None
        log.warning(BEYOND_END, partition=partition, committed_offset=committed.offset, fence=committed.fence,
                    low=bounds[0], high=bounds[1],
                    consequence="the topic was recreated or its log truncated: reading it from the earliest offset "
                    f"({bounds[0]}) with no fence and no window state, every record is judged")
    elif resume.reason == SETTINGS_CHANGED:
        assert current is not None and committed.offset is not None
        log.warning(SETTINGS_CHANGED, partition=partition, old=committed.settings or committed.settings_id,
                    new=current.summary, committed_offset=committed.offset, fence=committed.fence,
                    consequence=f"the committed fence and window state belong to the old settings: every line from "
                    f"offset {committed.offset} is judged again under the new ones; lines below {committed.fence} "
                    "may be judged twice (windows overlapping published ones, sessions cut in two)")
