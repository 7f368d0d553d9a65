"""Exactly-once: which outputs may enter the open transaction while a cut waits to be committed.

The transaction that commits a cut commits the offsets of the cut's partitions only. An output of any
other partition inside it would be committed with no offset of its own: after a crash, the replay from
that partition's last commit publishes it again (the chaos harness saw 53-79 duplicated windows when a
cut was taken before the second partition's first fetch)."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from logstream.checkpoint import CommitPolicy, CommittedPosition, Cut, OutputLedger, PartitionCut
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


class Host:
    """A commit host that owns ("logs", 0) and records the rewinds it is asked for."""

    def __init__(self, holds_outputs: bool) -> None:
        self.holds_outputs = holds_outputs
        self.ledger = OutputLedger()
        self.rewinds: list[tuple[str, int]] = []

    def ledgers(self) -> dict[tuple[str, int], OutputLedger]:
        return {("logs", 0): self.ledger}

    def rewound(self, tp: tuple[str, int], position: CommittedPosition) -> int | None:
        self.rewinds.append(tp)
        return position.offset


class TimingOutProducer:
    """A transactional producer whose commit times out (retriable: librdkafka says call it again)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def flush(self, timeout: float = 0) -> int:
        return 0

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], metadata: object, timeout: float) -> None:
        self.calls.append("send_offsets")

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "commit timed out", retriable=True))

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")

    def begin_transaction(self) -> None:
        self.calls.append("begin")


class Consumer:
    def __init__(self) -> None:
        self.seeks: list[TopicPartition] = []

    def consumer_group_metadata(self) -> object:
        return object()

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append(tp)


@pytest.mark.parametrize("holds_outputs", [True, False])
def test_a_timed_out_transaction_is_retried_only_by_a_host_that_held_what_came_after_its_cut(
        holds_outputs: bool) -> None:
    host = Host(holds_outputs)
    settings = Settings(input_topic=["logs"], group_id="g", detector="null", guarantee="exactly-once")
    exactly_once = CommitPolicy(settings, host, {}, threading.Event())  # type: ignore[arg-type]
    producer, consumer = TimingOutProducer(), Consumer()
    exactly_once.producer, exactly_once.consumer = producer, consumer  # type: ignore[assignment]
    cut = Cut({("logs", 0): PartitionCut(commit_offset=10, fence=10, required_seq=0, snapshot=None)})
    exactly_once.pending = cut
    assert exactly_once.commit(cut) is False
    if holds_outputs:  # the transaction holds nothing above the cut: the same cut is committed again later
        assert exactly_once.pending is cut and producer.calls == ["send_offsets", "commit"] and not host.rewinds
    else:  # lines produced since the cut are in the transaction: abort it, replay from the last commit
        assert exactly_once.pending is None and producer.calls == ["send_offsets", "commit", "abort", "begin"]
        assert host.rewinds == [("logs", 0)] and [(tp.partition, tp.offset) for tp in consumer.seeks] == [(0, 7)]
