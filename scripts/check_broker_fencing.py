"""Does this broker fence a stale group member's transactional offset commit (KIP-447)?

logstream's exactly-once mode needs it: a member expelled from the group that has not noticed yet
must not be able to commit offsets (and alerts) of a partition that now belongs to another member.
Apache Kafka 2.5+ rejects such a commit with ILLEGAL_GENERATION; the embedded test broker does not.

    python scripts/check_broker_fencing.py --bootstrap-servers HOST:PORT

Creates a two-partition topic, lets member `a` take both, keeps `a`'s group metadata, lets member
`b` join and take one partition, then commits offsets of `b`'s partition in a transaction carrying
`a`'s old metadata. Exit 0 when the broker rejects it, 1 when it accepts it. Takes about 30 s.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def member(bootstrap: str, topic: str, group: str, name: str) -> Consumer:
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "group.instance.id": name, "enable.auto.commit": False,
        "session.timeout.ms": 6000, "max.poll.interval.ms": 10000, "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky", "isolation.level": "read_committed",
        "log_level": 3,
    })
    consumer.subscribe([topic])
    return consumer


def poll_until(consumers: list[Consumer], done: callable, timeout: float) -> bool:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for consumer in consumers:
            consumer.poll(0.1)
        if done():
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", required=True)
    args = parser.parse_args()
    topic = f"logstream-fencing-check-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": args.bootstrap_servers})  # kept alive until the topic exists
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result()
    a = member(args.bootstrap_servers, topic, f"{topic}.g", "a")
    b = None
    try:
        if not poll_until([a], lambda: len(a.assignment()) == 2, 30):
            print("member a never got both partitions", file=sys.stderr)
            return 2
        stale = a.consumer_group_metadata()
        b = member(args.bootstrap_servers, topic, f"{topic}.g", "b")
        if not poll_until([a, b], lambda: len(b.assignment()) == 1 and len(a.assignment()) == 1, 60):
            print("the group never rebalanced to one partition each", file=sys.stderr)
            return 2
        moved = b.assignment()[0].partition
        producer = Producer({"bootstrap.servers": args.bootstrap_servers, "transactional.id": f"{topic}.t"})
        producer.init_transactions(15)
        producer.begin_transaction()
        try:
            producer.send_offsets_to_transaction([TopicPartition(topic, moved, 1)], stale, 15)
            producer.commit_transaction(15)
        except KafkaException as exc:
            print(f"fenced: the broker rejected the stale member's commit ({exc.args[0].str()})")
            return 0
        print("NOT fenced: the broker accepted a transactional offset commit from a stale group generation; "
              "exactly-once can publish a window twice after a member is expelled")
        return 1
    finally:
        a.close()
        if b is not None:
            b.close()


if __name__ == "__main__":
    sys.exit(main())
