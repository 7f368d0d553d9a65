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


class FatalFlag:
    """A fatal condition seen in a Kafka callback, raised on the poll thread at its next check."""

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        """Record `reason` unless one is recorded already: the first fatal condition is the cause, what
        follows (deliveries failing after a fence, say) is its consequence."""
        if self.reason is None:
            self.reason = reason

    def raise_if_set(self) -> None:
        """Raises FatalPipelineError naming the reason, once one was set."""
        if self.reason is not None:
            raise FatalPipelineError(self.reason)
