"""Errors a command reports as one line and an exit code, not a traceback (light: no Kafka import)."""

from __future__ import annotations


class KafkaSetupError(RuntimeError):
    """A command cannot do its work against Kafka; the message is one line for the operator.

    `exit_code` is what the command exits with: 1 when Kafka (or the consumer group) is not in a
    state to do the work, 2 when the command line names something that does not exist.
    """

    exit_code = 1
