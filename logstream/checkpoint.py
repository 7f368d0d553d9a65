"""Which offset is safe to commit, and what a replay from it needs to rebuild the same windows.

Every output (alert, dead-letter record, state snapshot) gets a sequence number in the ledger of the
input partition it came from. A *cut* is taken every commit interval: for each partition it records
  - the commit offset C: the first offset of the oldest open window (else the next offset to read),
    so a restart replays every line an open window still needs;
  - the fence P: the next offset to read when the cut was taken. Lines below P were fully handled
    (their windows, if closed, are part of this cut; their dead-letter records too), so a replay
    from C suppresses every side effect below P;
  - the windower snapshot (see below);
  - the outputs issued before the cut.
The cut is committed once all those outputs are done: acknowledged by the broker (at-least-once),
or produced inside the transaction that also carries the offsets (exactly-once). Outputs issued after
a pending cut are not part of it, so nothing is committed before the alerts it covers exist.

The fence and a small snapshot travel in the commit's metadata; a large snapshot is written to the
state topic and the metadata points at its records ([partition, offset] of each), which keeps within
Kafka's 4 KB offset-metadata limit. A snapshot larger than one record may be (`outputs.OutputLimits`)
is split over several records, read back and joined in order.

Snapshots: session engines record which sessions were open at P (and the event-time bound's state
where the replay starts); count engines the offsets where an idle cut closed every open window.
When an idle cut's windows are still to be published, the cut commits C at their first line and P
at the cut's line, so a replay reaches the cut and publishes them (`pipeline._close_idle_windows`).
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
    # (partition, offset) of each record of the snapshot in the state topic, set as they are acknowledged
    state_refs: list[tuple[int, int] | None] = field(default_factory=list)

    def metadata(self) -> str:
        """The commit metadata string: fence plus the snapshot inline, or pointers to its records."""
        body: dict[str, Any] = {"v": METADATA_VERSION, "fence": self.fence}
        if self.state_refs:
            refs = [list(ref) for ref in self.state_refs if ref is not None]
            if len(refs) != len(self.state_refs):
                raise RuntimeError("state records not acknowledged yet: the cut is not complete")
            body["state"] = refs[0] if len(refs) == 1 else refs
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
    state_refs: tuple[tuple[int, int], ...] = ()  # records of a snapshot kept in the state topic, in order


def parse_metadata(offset: int | None, metadata: str | None) -> CommittedPosition:
    """Decode a commit's metadata; metadata not written by logstream means a plain resume."""
    if offset is None or offset < 0:
        return CommittedPosition(None, 0, None)
    if not metadata:
        return CommittedPosition(offset, offset, None)
    try:
        body = orjson.loads(metadata)
        if not isinstance(body, dict) or body.get("v") != METADATA_VERSION:
            raise ValueError("not logstream metadata")
        refs = body.get("state") or []
        if refs and not isinstance(refs[0], list):
            refs = [refs]  # one record: [partition, offset]
        return CommittedPosition(
            offset,
            int(body.get("fence", offset)),
            body.get("snapshot"),
            tuple((int(ref[0]), int(ref[1])) for ref in refs),
        )
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError):
        return CommittedPosition(offset, offset, None)
