"""structlog set-up: one JSON object per line on stderr, so logs never mix with alerts on stdout."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(level: str = "INFO") -> None:
    """Route structlog (and stdlib logging from libraries) to stderr as JSON lines."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.WARNING), format="%(name)s %(message)s")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


class LogThrottle:
    """At most one log line per key per interval, counting what was held back (for error storms)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """The number of suppressed events since the last allowed one, or None to suppress this one."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class _StructlogHandler(logging.Handler):
    """Forwards stdlib records (librdkafka's own log lines) to structlog, so stderr stays JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(record.levelno, "client_log", message=record.getMessage())


def kafka_client_logger() -> logging.Logger:
    """The logger handed to confluent-kafka clients (`logger` config key)."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(handler, _StructlogHandler) for handler in logger.handlers):
        logger.addHandler(_StructlogHandler())
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    return logger
