"""Noticing a consumer that gets no partitions, and saying why (instead of waiting silently).

A member can wait for its partitions forever: a member killed without leaving the group (SIGKILL,
OOM) stays in it until the coordinator expires its session - Apache Kafka does after
session.timeout.ms, the embedded test broker never does - and every rebalance waits for it. Or
other members hold every partition of a topic. `AssignmentWatch` tracks which input topics got a
partition; once `timeout_s` passes without one, `explain` turns the coordinator's view of the group
into one sentence with the remedy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException

from logstream.kafka import GroupView, KafkaSetupError, describe_group
from logstream.logs import get_logger
from logstream.settings import Settings

log = get_logger(__name__)

STATIC_MEMBERSHIP_REMEDY = (
    "run every instance with --group-instance-id (static membership; exactly-once uses the host name by default) "
    "and restart a killed instance with the same id, or start over with a new --group-id"
)


class NoAssignment(KafkaSetupError):
    """`--once`: an input topic got no partition within the assignment timeout."""


class AssignmentWatch:
    """Which input topics this member got partitions of, and whether it has waited too long.

    `on_assign` is fed every assignment callback (an empty one included: the group answered).
    `overdue` is true once per `timeout_s` while the wait is not over, so a caller reports at
    that rate, not on every poll.
    """

    def __init__(self, topics: Iterable[str], timeout_s: float, now: float | None = None) -> None:
        self.topics = list(dict.fromkeys(topics))
        self.timeout_s = timeout_s
        self.started = time.monotonic() if now is None else now
        self.rebalanced = False  # the group completed a rebalance that included us
        self.assigned_topics: set[str] = set()
        self._next_report = self.started + timeout_s

    def on_assign(self, topics: Iterable[str]) -> None:
        self.rebalanced = True
        self.assigned_topics.update(topics)

    @property
    def unassigned(self) -> list[str]:
        """Input topics of which this member has never had a partition."""
        return [topic for topic in self.topics if topic not in self.assigned_topics]

    def waiting(self, once: bool) -> bool:
        """Still waiting: no rebalance completed yet, or (`once`) an input topic without a partition."""
        return not self.rebalanced or (once and bool(self.unassigned))

    def overdue(self, once: bool, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if not self.waiting(once) or now < self._next_report:
            return False
        self._next_report = now + self.timeout_s
        return True

    def waited_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


def check_assignment(watch: AssignmentWatch, settings: Settings, consumer: Consumer, once: bool) -> str | None:
    """Call every poll: once per timeout while waiting, the reason no partition came, logged as
    `no_partitions_assigned` (and returned, for /readyz); with `once`, `NoAssignment` instead."""
    if not watch.overdue(once):
        return None
    try:
        member_id = consumer.memberid()
    except (KafkaException, RuntimeError):
        member_id = None
    unassigned = watch.unassigned
    why = explain(settings.group_id, describe_group(settings), member_id, unassigned, watch.rebalanced)
    waited = watch.waited_s()
    if once:
        raise NoAssignment(f"no partition of {', '.join(unassigned)} was assigned to this member of group "
                           f"{settings.group_id!r} within {waited:.0f} s: {why}")
    log.error("no_partitions_assigned", group=settings.group_id, waited_s=round(waited), topics=unassigned,
              reason=why, static_member_id=settings.static_member_id)
    return why


def explain(group_id: str, view: GroupView | None, member_id: str | None, unassigned: list[str],
            rebalanced: bool) -> str:
    """One sentence: what the group looks like from here and what to do about it."""
    if view is None:
        return f"the coordinator of group {group_id!r} did not describe the group; check the broker's logs"
    others = view.others(member_id)
    if "REBALANC" in view.state.upper() or not rebalanced:
        dynamic = [m for m in others if not m[1]]
        if dynamic:
            names = ", ".join(f"{m[0]} from {m[2]}" for m in dynamic[:5])
            return (f"group {group_id!r} is {view.state.lower()} and waits for {len(dynamic)} other dynamic "
                    f"member(s) that do not rejoin ({names}): most likely an instance killed without leaving the "
                    f"group, which Apache Kafka expires after the session timeout and the embedded broker never "
                    f"does; {STATIC_MEMBERSHIP_REMEDY}")
        static = ", ".join(sorted({m[1] for m in others if m[1]}))
        return (f"group {group_id!r} is {view.state.lower()} with {len(others)} other member(s); the rebalance has "
                f"not completed (members: {_members(others)})"
                + (f"; a stopped static member holds it up until it is restarted with its own id ({static}) or "
                   f"its session expires" if static else ""))
    holders = [m for m in others if any(p.split("/", 1)[0] in unassigned for p in m[3])]
    if holders:
        return (f"the partitions of {', '.join(unassigned)} are assigned to other members of group {group_id!r} "
                f"({_members(holders)}); stop them, or give this run its own --group-id")
    return (f"group {group_id!r} is {view.state.lower()} with {len(others)} other member(s) and this member owns "
            f"no partition of {', '.join(unassigned) or 'its input topics'}")


def _members(members: list[tuple[str, str | None, str, list[str]]]) -> str:
    return "; ".join(f"{m[1] or m[0]} on {m[2]} holding {', '.join(m[3]) or 'nothing'}" for m in members[:5])
