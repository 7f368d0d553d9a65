"""Which offset is safe to commit, and what a replay from it needs to rebuild the same windows.

Every output (alert, dead-letter record, state snapshot) gets a sequence number in the ledger of the
input partition it came from. A *cut* is taken every commit interval: for each partition it records
  - the commit offset C: the first offset of the oldest open window (else the next offset to read),
    so a restart replays every line an open window still needs;
  - the fence P: the next offset to read when the cut was taken. Lines below P were fully handled
    (their windows, if closed, are part of this cut; their dead-letter records too), so a replay
    from C suppresses every side effect below P;
  - the windower snapshot (session engines only): which sessions were open at P;
  - the outputs issued before the cut.
The cut is committed once all those outputs are done: acknowledged by the broker (at-least-once),
or produced inside the transaction that also carries the offsets (exactly-once). Outputs issued after
a pending cut are not part of it, so nothing is committed before the alerts it covers exist.

The fence and a small snapshot travel in the commit's metadata; a large snapshot is written to the
state topic and the metadata points at it (partition, offset), which keeps within Kafka's 4 KB
offset-metadata limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

METADATA_VERSION = 1
INLINE_SNAPSHOT_LIMIT = 2048

TopicPartitionKey = tuple[str, int]


class OutputLedger:
    """Sequence numbers of one partition's outputs, and which of them are done."""

    __slots__ = ("issued", "_done", "done_through")

    def __init__(self) -> None:
        self.issued = 0
        self._done: set[int] = set()
        self.done_through = 0  # every seq <= this is done

    def issue(self) -> int:
        self.issued += 1
        return self.issued

    def complete(self, seq: int) -> None:
        if seq <= self.done_through:
            return
        self._done.add(seq)
        while self.done_through + 1 in self._done:
            self.done_through += 1
            self._done.discard(self.done_through)

    @property
    def outstanding(self) -> int:
        return self.issued - self.done_through - len(self._done)


@dataclass(slots=True)
class PartitionCut:
    """The committable position of one partition at the moment a cut was taken."""

    commit_offset: int
    fence: int
    required_seq: int
    snapshot: dict[str, Any] | None
    state_ref: tuple[int, int] | None = None  # (partition, offset) of the snapshot in the state topic
    state_seq: int | None = None  # ledger seq of that state record while it is in flight

    def metadata(self) -> str:
        """The commit metadata string: fence plus the snapshot inline, or a pointer to it."""
        body: dict[str, Any] = {"v": METADATA_VERSION, "fence": self.fence}
        if self.state_ref is not None:
            body["state"] = list(self.state_ref)
        elif self.snapshot is not None:
            body["snapshot"] = self.snapshot
        return orjson.dumps(body).decode()

    @property
    def needs_state_record(self) -> bool:
        return self.snapshot is not None and len(orjson.dumps(self.snapshot)) > INLINE_SNAPSHOT_LIMIT


@dataclass(slots=True)
class Cut:
    """One cut across all assigned partitions; committed as a whole."""

    partitions: dict[TopicPartitionKey, PartitionCut] = field(default_factory=dict)

    def complete(self, ledgers: dict[TopicPartitionKey, OutputLedger]) -> bool:
        for tp, cut in self.partitions.items():
            ledger = ledgers.get(tp)
            if ledger is not None and ledger.done_through < cut.required_seq:
                return False
        return True


@dataclass(slots=True, frozen=True)
class CommittedPosition:
    """What a previous owner committed for a partition: where to resume and how to rebuild."""

    offset: int | None  # None: nothing committed yet
    fence: int
    snapshot: dict[str, Any] | None
    state_ref: tuple[int, int] | None


def parse_metadata(offset: int | None, metadata: str | None) -> CommittedPosition:
    """Decode a commit's metadata; metadata not written by logstream means a plain resume."""
    if offset is None or offset < 0:
        return CommittedPosition(None, 0, None, None)
    if not metadata:
        return CommittedPosition(offset, offset, None, None)
    try:
        body = orjson.loads(metadata)
        if not isinstance(body, dict) or body.get("v") != METADATA_VERSION:
            raise ValueError("not logstream metadata")
        ref = body.get("state")
        return CommittedPosition(
            offset,
            int(body.get("fence", offset)),
            body.get("snapshot"),
            (int(ref[0]), int(ref[1])) if ref else None,
        )
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError):
        return CommittedPosition(offset, offset, None, None)
