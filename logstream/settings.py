"""One settings object for every logstream command: CLI flags and LOGSTREAM_* environment variables.

Every field is a flag (`--window-size`) and an environment variable (`LOGSTREAM_WINDOW_SIZE`);
a flag given on the command line wins over the environment, which wins over the default.
Derived values are properties, so nothing is stored twice.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogFormat = Literal["hdfs", "bgl", "thunderbird", "liberty", "generic"]
WindowKind = Literal["session", "count"]
EmitMode = Literal["anomalous", "all"]
Guarantee = Literal["at-least-once", "exactly-once"]
FuturePolicy = Literal["dead-letter", "clamp"]
DetectorName = Literal["logllm", "logllama", "novelty", "null"]
LogLLMEvidence = Literal["occlusion", "gradient", "attention", "mixed", "off"]  # logstream.attribution


# Measured on the shared HDFS training sample (5,727 blocks over 38.7 h): the longest quiet spell inside
# one block is 12.9 h, and a 300 s gap cuts 79 % of the blocks into several sessions. One day keeps every
# block whole, as the LogLLM paper does (all lines of a block form one session).
HDFS_SESSION_GAP_S = 86_400.0
DEFAULT_SESSION_GAP_S = 300.0
# Window defaults, the one place they are written: the fields below and the engines in logstream.windows use them.
WINDOW_SIZE = 100
SESSION_GRACE_S = 30.0
SESSION_MAX_LINES = 1000
SESSION_MAX_OPEN = 100_000
FUTURE_CONFIRM_LINES = 3

# Kafka's rule for topic names (and group.instance.id): org.apache.kafka.common.internals.Topic.validate.
KAFKA_NAME_MAX = 249
KAFKA_NAME_CHARS = re.compile(r"[a-zA-Z0-9._-]+")
STATE_TOPIC_SUFFIX = ".logstream-state"

# librdkafka keys that logstream sets itself (logstream.kafka: client_config, consumer_config,
# producer_config): a --kafka-option naming one is refused, with what to use instead. Overriding
# them would break what the README promises (offsets committed only by cuts, the group the logs
# name, transactions, fencing). Every other key is passed through (security.*, ssl.*, sasl.*,
# linger.ms, compression.type, topic.metadata.refresh.interval.ms, reconnect backoff, ...), and
# auto.offset.reset: a new group reads from the earliest record by default, `latest` skips the
# history (those lines are never judged: the operator's choice, e.g. a topic with a year retained);
# tests/unit/test_settings_validation.py checks this list against the configurations kafka.py builds.
MANAGED_KAFKA_OPTIONS: dict[str, str] = {
    "bootstrap.servers": "use --bootstrap-servers",
    "group.id": "use --group-id",
    "group.instance.id": "use --group-instance-id",
    "transactional.id": "derived from --group-id and --group-instance-id (exactly-once)",
    "session.timeout.ms": "use --session-timeout-ms",
    "max.poll.interval.ms": "use --max-poll-interval-ms",
    "enable.auto.commit": "logstream commits offsets itself, only once the outputs below them are delivered",
    "enable.auto.offset.store": "logstream commits offsets itself, only once the outputs below them are delivered",
    "enable.partition.eof": "--once and replays rely on end-of-partition events",
    "isolation.level": "read_committed keeps aborted transactions' records out (exactly-once chains)",
    "partition.assignment.strategy": "the rebalance handling is written for cooperative-sticky",
    "enable.idempotence": "required for ordered, duplicate-free outputs and for transactions",
    "acks": "all is required by the idempotent producer",
    "message.max.bytes": "derived from --alert-max-bytes and --dlq-max-bytes",
    "error_cb": "logstream's own callback detects fenced and broken clients",
    "logger": "logstream routes librdkafka's logs through its JSON logs",
}

# LOGSTREAM_* variables that are not settings and are read elsewhere: no "unknown variable" warning.
ENVIRONMENT_NOT_SETTINGS = frozenset({
    "LOGSTREAM_TEST_WORKERS",  # scripts/test.sh: pytest-xdist workers
    "LOGSTREAM_TEST_LOG_LEVEL",  # tests/conftest.py: the test suite's log level
})
ENV_PREFIX = "LOGSTREAM_"


def kafka_name_problem(name: str) -> str | None:
    """Why Kafka refuses `name` as a topic name or group.instance.id, as a predicate ("is empty"); None
    when it is legal.

    Kafka's own rule: not empty, not "." or "..", at most 249 characters, only ASCII letters,
    digits, '.', '_' and '-'.
    """
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is not allowed"
    if len(name) > KAFKA_NAME_MAX:
        return f"is {len(name)} characters long (at most {KAFKA_NAME_MAX})"
    if not KAFKA_NAME_CHARS.fullmatch(name):
        bad = ", ".join(repr(char) for char in sorted({c for c in name if not KAFKA_NAME_CHARS.fullmatch(c)}))
        return f"has characters Kafka does not allow ({bad}; only letters, digits, '.', '_' and '-')"
    return None


def legal_kafka_name(name: str, what: str) -> str:
    """`name` unchanged when Kafka takes it as a topic name; else ValueError "<what> '<name>' <why>"."""
    problem = kafka_name_problem(name)
    if problem is not None:
        raise ValueError(f"{what} {name!r} {problem}")
    return name


def default_cache_dir() -> Path:
    """Where prepared models and the embedded broker's data live unless told otherwise.

    With no HOME (and no passwd entry) this is `~/.cache/logstream` unexpanded; the commands that
    write to it refuse it with a sentence (`basemodels.writable_cache_dir`).
    """
    try:
        home = Path.home()
    except RuntimeError:
        home = Path("~")
    return home / ".cache" / "logstream"


class Settings(BaseSettings):
    """Configuration of a logstream process (consumer, broker, model preparation)."""

    model_config = SettingsConfigDict(
        env_prefix="LOGSTREAM_", frozen=True, extra="forbid", env_parse_none_str="", populate_by_name=True
    )

    # --- Kafka wiring -------------------------------------------------------------------------
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]")
    input_topic: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="raw log topic to consume (repeatable; in the environment: comma-separated or a JSON list)",
    )
    alerts_topic: str = Field("logstream.alerts", description="topic the alerts (verdicts) are published to")
    dlq_topic: str = Field("logstream.dlq", description="dead-letter topic for records that cannot be processed")
    group_id: str = Field("logstream", description="Kafka consumer group")
    group_instance_id: str | None = Field(
        None,
        description="static group membership id (one per replica; also names the transactional producer); "
        "default: the host name with --guarantee exactly-once, none (dynamic member) otherwise",
    )
    state_topic: str | None = Field(
        None, description="topic holding open-session snapshots for exact replay (default: <group-id>.logstream-state)"
    )
    repartition_topic: str | None = Field(
        None, description="internal topic `logstream repartition` writes, keyed by block id (then run reads it)"
    )
    kafka_option: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="extra librdkafka settings for consumer and producer, e.g. security.protocol (JSON object in "
        "env); keys logstream sets itself (group.id, enable.auto.commit, ...) are refused",
    )
    create_topics: bool = Field(True, description="create missing output/state topics at start")
    topic_partitions: int = Field(1, ge=1, description="partitions for topics logstream creates itself")
    topic_replication: int = Field(1, ge=1, description="replication factor for topics logstream creates itself")

    # --- Parsing ------------------------------------------------------------------------------
    format: LogFormat = Field("generic", description="line format of the raw topic")
    max_line_bytes: int = Field(1_048_576, ge=64, description="longer records go to the dead-letter topic")
    dlq_max_bytes: int = Field(
        1_000_000, ge=1024,
        description="largest dead-letter record: a longer original keeps its first bytes, with its full size in "
        "header logstream.original-size (raise together with the topic's max.message.bytes)",
    )
    alert_max_bytes: int = Field(
        1_000_000, ge=4096,
        description="largest alert document: longer templates, sample lines and evidence are cut (marked "
        "truncated) to fit; lowered at start to what the alerts topic's max.message.bytes takes",
    )

    # --- Windowing ----------------------------------------------------------------------------
    window: WindowKind = Field("count", description="count windows or session windows keyed by block id")
    window_size: int = Field(WINDOW_SIZE, ge=1, description="lines per count window")
    window_stride: int | None = Field(None, ge=1, description="lines between count window starts (default: size)")
    session_gap: float | None = Field(
        None, gt=0,
        description="seconds of event-time inactivity that close a session (default: 86400 for hdfs, whose "
        "blocks stay quiet for hours between lines; 300 otherwise)",
    )
    session_grace: float = Field(SESSION_GRACE_S, ge=0, description="extra event-time seconds allowed for late lines")
    session_max_lines: int = Field(SESSION_MAX_LINES, ge=1, description="a session reaching this many lines closes")
    session_max_open: int = Field(
        SESSION_MAX_OPEN, ge=1, description="open sessions per partition; the oldest closes first"
    )
    window_idle_s: float = Field(
        300.0, ge=0,
        description="close the open count windows of a partition after this many seconds without a new line "
        "(reason idle; the cut is committed before its windows are published, so a replay cuts the same "
        "windows); 0: never",
    )
    session_idle_s: float = Field(
        0.0, ge=0,
        description="session windows: close every open session of a partition after this many seconds without "
        "a new line (reason idle; committed before its windows are published, as --window-idle-s does); 0 "
        "(default): never, sessions close in event time only. A cut session is judged without the lines "
        "that come later (HDFS blocks are often deleted hours after they are written)",
    )
    max_future_s: float | None = Field(
        None, ge=0,
        description="session windows: a line whose event time is more than this many seconds ahead of its "
        "partition's stream time (plus the record time elapsed since) is from a wrong clock: --future-policy "
        "applies (default: session gap + grace, the jump past which one line would make correctly stamped "
        "lines late); 0: no bound",
    )
    future_policy: FuturePolicy = Field(
        "dead-letter",
        description="a line past --max-future-s: dead-letter (reason future_timestamp) or clamp (joins with "
        "the stream's time as its event time)",
    )
    future_confirm_lines: int = Field(
        FUTURE_CONFIRM_LINES, ge=2,
        description="this many consecutive lines past --max-future-s are a genuine jump of the stream (a gap in a "
        "backfill), not a wrong clock: the last of them is accepted and moves stream time",
    )

    # --- Detection ----------------------------------------------------------------------------
    detector: DetectorName | None = Field(
        None,
        description="required by `logstream run`: logllm (trained LogLLM artifact), logllama (unsupervised "
        "next-key model), novelty (unseen-template model), or null (judges every window normal: never alerts; "
        "for plumbing checks)",
    )
    model: Path | None = Field(
        None, description="detector artifact: a directory (logllm, logllama) or a JSON file (novelty)"
    )
    emit: EmitMode = Field("anomalous", description="publish anomalous windows only, or every verdict")
    batch_size: int = Field(16, ge=1, description="windows scored together")
    batch_max_wait_ms: int = Field(50, ge=0, description="how long a partial batch waits for more windows")
    queue_max_windows: int = Field(256, ge=1, description="windows waiting for scoring before partitions pause")

    # --- Model resources (LogLLM / LogLLaMA) --------------------------------------------------
    embedder: Path | None = Field(None, description="BERT-family encoder directory (default: embedded MiniLM)")
    llm: Path | None = Field(None, description="Llama-architecture LM directory or .gguf file (default: SmolLM2)")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="prepared models and broker data")
    device: str | None = Field(None, description="torch device (default: cuda when available, else cpu)")
    load_in_4bit: bool = Field(False, description="load the LLM in 4-bit NF4 (bitsandbytes, CUDA only)")
    max_messages: int = Field(128, ge=1, description="messages per window given to the model (the latest kept)")
    embedding_cache_size: int = Field(50_000, ge=0, description="masked messages whose embeddings are kept")
    verdict_cache_size: int = Field(10_000, ge=0, description="window verdicts kept, keyed by masked messages")
    logllm_evidence: LogLLMEvidence = Field(
        "occlusion",
        description="how LogLLM names the lines behind an anomalous verdict (alert evidence): occlusion, gradient, "
        "attention, mixed, or off (see README: evidence for LogLLM verdicts)",
    )

    # --- Delivery and lifecycle ---------------------------------------------------------------
    guarantee: Guarantee = Field("at-least-once", description="at-least-once or exactly-once (transactions)")
    once: bool = Field(False, description="consume to the end offsets as of start, close all windows, exit")
    commit_interval_s: float = Field(5.0, gt=0, description="seconds between offset commits")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="time allowed to drain, publish and commit on stop")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="Kafka max.poll.interval.ms")
    session_timeout_ms: int = Field(45_000, ge=1000, description="Kafka session.timeout.ms")
    connect_timeout_s: float = Field(
        20.0, gt=0, description="seconds to reach a bootstrap server at start (retried with backoff) before exiting 1"
    )
    assignment_timeout_s: float | None = Field(
        None, gt=0,
        description="seconds to wait for partitions before logging why none came (the group's members); with "
        "--once, exit 1 when an input topic got no partition by then (default: session timeout + 30 s)",
    )

    # --- Operations ---------------------------------------------------------------------------
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve /metrics, /healthz, /readyz here")
    log_level: str = Field("INFO", description="structlog level: DEBUG, INFO, WARNING, ERROR")

    @field_validator("input_topic", mode="before")
    @classmethod
    def _topics_from_text(cls, value: object) -> object:
        """`LOGSTREAM_INPUT_TOPIC=logs.a,logs.b` or `'["logs.a"]'`, as operators write it."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [topic.strip() for topic in text.split(",") if topic.strip()]
        return value

    @field_validator("input_topic")
    @classmethod
    def _legal_input_topics(cls, value: list[str]) -> list[str]:
        for topic in value:
            legal_kafka_name(topic, "topic name")
        return value

    @field_validator("alerts_topic", "dlq_topic", "state_topic", "repartition_topic")
    @classmethod
    def _legal_topic(cls, value: str | None) -> str | None:
        return None if value is None else legal_kafka_name(value, "topic name")

    @field_validator("group_instance_id")
    @classmethod
    def _legal_instance_id(cls, value: str | None) -> str | None:
        """Kafka checks a static member id with its topic-name rule; an empty one is a mistake, not "unset"."""
        return None if value is None else legal_kafka_name(value, "group.instance.id")

    @field_validator("group_id", "bootstrap_servers")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"{value!r} is not a log level (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        return level

    @field_validator("kafka_option", mode="before")
    @classmethod
    def _options_from_text(cls, value: object) -> object:
        """`LOGSTREAM_KAFKA_OPTION='{"security.protocol": "SASL_SSL", "linger.ms": 10}'`: a JSON object whose
        numbers and booleans become librdkafka's text values; unset or empty is no option."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not JSON ({exc.msg} at character {exc.pos}); write a JSON object, e.g. "
                                 '{"security.protocol": "SASL_SSL"}') from None
            if not isinstance(value, dict):
                raise ValueError('must be a JSON object of librdkafka settings, e.g. {"security.protocol": "SASL_SSL"}')
        if isinstance(value, dict):
            return {key: _option_text(option) for key, option in value.items()}
        return value

    @field_validator("kafka_option")
    @classmethod
    def _unmanaged_options(cls, value: dict[str, str]) -> dict[str, str]:
        managed = [key for key in value if key.strip() in MANAGED_KAFKA_OPTIONS]
        if managed:
            raise ValueError("; ".join(f"{key} is set by logstream itself ({MANAGED_KAFKA_OPTIONS[key.strip()]})"
                                       for key in managed))
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.window_stride is not None and self.window_stride > self.window_size:
            raise ValueError(
                f"window_stride ({self.window_stride}) must not exceed window_size ({self.window_size}): "
                "a larger stride would skip lines that no window judges"
            )
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError(
                f"max_poll_interval_ms ({self.max_poll_interval_ms}) must not be below session_timeout_ms "
                f"({self.session_timeout_ms}): Kafka's consumer refuses a poll interval shorter than its session"
            )
        self._check_output_topics()
        return self

    def _check_output_topics(self) -> None:
        """The topics `run` writes are legal names, none is an input topic (it would read back its own
        output, without end) and no two are the same (each holds another kind of record)."""
        if self.state_topic is None and (problem := kafka_name_problem(self.resolved_state_topic)) is not None:
            raise ValueError(
                f"the state topic {self.resolved_state_topic!r} (--group-id + {STATE_TOPIC_SUFFIX!r}) {problem}; set "
                "--state-topic, or use a group id of letters, digits, '.', '_' and '-'"
            )
        outputs = self.output_topics
        for flag, topic in outputs.items():
            if topic in self.input_topic:
                raise ValueError(
                    f"{flag} {topic!r} is also an --input-topic: logstream would read back what it writes there "
                    "as log lines, without end; give every output a topic of its own"
                )
        seen: dict[str, str] = {}
        for flag, topic in outputs.items():
            if topic in seen:
                raise ValueError(
                    f"{seen[topic]} and {flag} are the same topic {topic!r}: alerts, dead letters and state snapshots "
                    "are different records (the state topic is compacted); give each its own topic"
                )
            seen[topic] = flag

    def repartition_problem(self) -> str | None:
        """Why `logstream repartition` cannot run with these topics (None: it can). Only that command writes
        --repartition-topic; `run` reads it as its --input-topic, so the two may share a configuration."""
        if not self.input_topic or not self.repartition_topic:
            return "--input-topic and --repartition-topic are required"
        if self.repartition_topic in self.input_topic:
            return (f"--repartition-topic {self.repartition_topic!r} is also an --input-topic: repartition would "
                    "re-read every line it writes, without end")
        return None

    @property
    def output_topics(self) -> dict[str, str]:
        """The topics `run` writes, by the flag that names them (the state topic as resolved)."""
        return {"--alerts-topic": self.alerts_topic, "--dlq-topic": self.dlq_topic,
                "--state-topic": self.resolved_state_topic}

    @property
    def stride(self) -> int:
        return self.window_stride or self.window_size

    @property
    def effective_session_gap(self) -> float:
        if self.session_gap is not None:
            return self.session_gap
        return HDFS_SESSION_GAP_S if self.format == "hdfs" else DEFAULT_SESSION_GAP_S

    def future_bound(self, gap: float) -> float | None:
        """Seconds a line may be ahead of stream time with session gap `gap` (None: no bound)."""
        if self.max_future_s is not None:
            return self.max_future_s or None
        return gap + self.session_grace

    @property
    def resolved_state_topic(self) -> str:
        return self.state_topic or f"{self.group_id}{STATE_TOPIC_SUFFIX}"

    @property
    def transactional_id(self) -> str:
        """Stable per replica, so a restarted instance fences its own earlier incarnation."""
        return f"{self.group_id}.{self.group_instance_id or socket.gethostname()}"

    @property
    def static_member_id(self) -> str | None:
        """`group.instance.id`: the one given, else the host name in exactly-once mode, else none (dynamic).

        Exactly-once already assumes one instance per host and group (the host name is in its
        transactional id), so the same name as static member id costs nothing and lets an instance
        killed with SIGKILL rejoin as itself instead of waiting for its dead member to expire.
        """
        if self.group_instance_id:
            return self.group_instance_id
        return socket.gethostname() if self.guarantee == "exactly-once" else None

    @property
    def effective_assignment_timeout_s(self) -> float:
        if self.assignment_timeout_s is not None:
            return self.assignment_timeout_s
        return self.session_timeout_ms / 1000.0 + 30.0


def _option_text(value: object) -> object:
    """A librdkafka value as text: JSON true/false become "true"/"false", numbers their digits; else unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def unknown_environment(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The LOGSTREAM_* variables of `environ` that are no setting, each with the closest setting's variable.

    pydantic-settings ignores them (a typo such as LOGSTREAM_WINDOW_SIZ silently leaves the default);
    names are matched without case, as pydantic-settings reads them. Variables read elsewhere
    (`ENVIRONMENT_NOT_SETTINGS`) are not reported. The suggestion is None when no setting is close.
    """
    fields = list(Settings.model_fields)
    found: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in ENVIRONMENT_NOT_SETTINGS:
            continue
        field = upper[len(ENV_PREFIX):].lower()
        if field in Settings.model_fields:
            continue
        near = difflib.get_close_matches(field, fields, n=1, cutoff=0.6)
        found.append((name, ENV_PREFIX + near[0].upper() if near else None))
    return found
