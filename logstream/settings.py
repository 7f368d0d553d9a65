"""One settings object for every logstream command: CLI flags and LOGSTREAM_* environment variables.

Every field is a flag (`--window-size`) and an environment variable (`LOGSTREAM_WINDOW_SIZE`);
a flag given on the command line wins over the environment, which wins over the default.
Derived values are properties, so nothing is stored twice.
"""

from __future__ import annotations

import json
import socket
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
    kafka_option: dict[str, str] = Field(
        default_factory=dict,
        description="extra librdkafka settings for consumer and producer, e.g. security.protocol (JSON object in env)",
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

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.window_stride is not None and self.window_stride > self.window_size:
            raise ValueError(
                f"window_stride ({self.window_stride}) must not exceed window_size ({self.window_size}): "
                "a larger stride would skip lines that no window judges"
            )
        return self

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
        return self.state_topic or f"{self.group_id}.logstream-state"

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
