"""Exactly-once: which outputs may enter the open transaction while a cut waits to be committed.

The transaction that commits a cut commits the offsets of the cut's partitions only. An output of any
other partition inside it would be committed with no offset of its own: after a crash, the replay from
that partition's last commit publishes it again (the chaos harness saw 53-79 duplicated windows when a
cut was taken before the second partition's first fetch)."""

from __future__ import annotations

import threading

from logstream.checkpoint import CommitPolicy, Cut, PartitionCut
from logstream.settings import Settings


def policy(guarantee: str) -> CommitPolicy:
    settings = Settings(input_topic=["logs"], group_id="g", detector="null", guarantee=guarantee)
    return CommitPolicy(settings, host=None, producer_config={}, stop_event=threading.Event())  # type: ignore[arg-type]


def test_outputs_after_the_pending_cut_wait_and_a_partition_left_out_of_it_waits_whole() -> None:
    exactly_once = policy("exactly-once")
    assert not exactly_once.holds(("logs", 1), 1)  # no cut pending: into the open transaction
    exactly_once.pending = Cut({("logs", 0): PartitionCut(commit_offset=10, fence=12, required_seq=5, snapshot=None)})
    assert not exactly_once.holds(("logs", 0), 5)  # issued before the cut: its transaction carries it
    assert exactly_once.holds(("logs", 0), 6)  # issued after it: the next transaction
    assert exactly_once.holds(("logs", 1), 1)  # its partition has no offset in this transaction
    assert not policy("at-least-once").holds(("logs", 1), 1)  # nothing is held without a transaction
