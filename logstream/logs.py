"""structlog set-up: one JSON object per line on stderr, so logs never mix with alerts on stdout."""

from __future__ import annotations

import logging
import sys
import time

import orjson
import structlog

CLIENT_LOG_INTERVAL_S = 10.0  # at most one librdkafka line per facility and level this often


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
    """Forwards stdlib records (librdkafka's own log lines) to structlog, so stderr stays JSON.

    librdkafka logs every failed connection attempt (about 20 a second against a refused port), so
    lines are rate-limited: at most one per client log facility and level every `interval_s`, with
    the number held back since the previous one (`suppressed_since_last`).
    """

    def __init__(self, interval_s: float = CLIENT_LOG_INTERVAL_S) -> None:
        super().__init__()
        self._throttle = LogThrottle(interval_s)

    def emit(self, record: logging.LogRecord) -> None:
        # confluent-kafka logs ("%s [%s] %s", facility, client name, message)
        args = record.args if isinstance(record.args, tuple) else ()
        facility = str(args[0]) if len(args) == 3 else ""
        suppressed = self._throttle.allow(f"{record.name}:{record.levelno}:{facility}", time.monotonic())
        if suppressed is None:
            return
        fields: dict[str, object] = {"message": record.getMessage()}
        if facility:
            fields.update(facility=facility, client=str(args[1]), message=str(args[2]))
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        structlog.get_logger(record.name).log(record.levelno, "client_log", **fields)


def kafka_client_logger() -> logging.Logger:
    """The logger handed to confluent-kafka clients (`logger` config key): JSON, rate-limited."""
    logger = logging.getLogger("librdkafka")
    if not any(isinstance(handler, _StructlogHandler) for handler in logger.handlers):
        logger.addHandler(_StructlogHandler())
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    return logger
