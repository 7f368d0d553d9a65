"""Errors a command reports as one line and an exit code, not a traceback (light: no Kafka import)."""

from __future__ import annotations


class KafkaSetupError(RuntimeError):
    """A command cannot do its work against Kafka; the message is one line for the operator.

    `exit_code` is what the command exits with: 1 when Kafka (or the consumer group) is not in a
    state to do the work, 2 when the command line names something that does not exist.
    """

    exit_code = 1


class FatalPipelineError(RuntimeError):
    """The process must stop without committing more (a lost delivery, a fenced producer)."""


FENCED_PREFIX = "fenced: "  # how every reason for a fenced instance begins (logstream.kafka.fatal_reason)


def first_cause(current: str | None, new: str) -> str:
    """The reason to report of two fatal conditions: the first one, unless only the later one names a fence.

    The first condition is the cause and what follows its consequence (deliveries failing after a
    fence), except that librdkafka may first raise a bare "Local: Fatal error" (a produce call) and
    name the fence only later (the error callback, the flush on close): then the fence explains it.
    """
    if current is None or (new.startswith(FENCED_PREFIX) and not current.startswith(FENCED_PREFIX)):
        return new
    return current


class FatalFlag:
    """A fatal condition seen in a Kafka callback, raised on the poll thread at its next check."""

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        """Record `reason` unless an earlier one explains it (`first_cause`)."""
        self.reason = first_cause(self.reason, reason)

    def raise_if_set(self) -> None:
        """Raises FatalPipelineError naming the reason, once one was set."""
        if self.reason is not None:
            raise FatalPipelineError(self.reason)
