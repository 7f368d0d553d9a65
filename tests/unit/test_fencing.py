"""A fenced instance (another one took its transactional id or static member id) stops with one line and
exit 2, wherever the fence surfaces: in the loop, or only while closing (the producer's flush, the
consumer's close and the revoke it runs). Clients are stand-ins raising the errors librdkafka raises."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from logstream.checkpoint import CommitPolicy
from logstream.cli import main
from logstream.detectors.null import NullDetector
from logstream.errors import FatalFlag, FatalPipelineError, first_cause
from logstream.kafka import fatal_reason, is_fatal, is_fenced, lost_client_error
from logstream.logs import configure_logging
from logstream.pipeline import Pipeline
from logstream.settings import Settings

FENCED = KafkaError(KafkaError._FENCED, fatal=True)
# how librdkafka's error callback reports a fence: _FATAL, with the original reason in the text
MEMBER_FENCED = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer with "
                           "same group.instance.id: Fatal consumer error", fatal=True)


# what produce() raises once the producer is fenced: the fence itself is named only later (the flush)
BARE = KafkaError(KafkaError._FATAL, "Unable to produce message: Local: Fatal error", fatal=True)


# confluent-kafka 2.16 sometimes loses the fatal error a flush raises (a delivery callback ran in the same call)
LOST = SystemError("<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an exception")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    configure_logging(os.environ.get("LOGSTREAM_TEST_LOG_LEVEL", "WARNING"))


class FencedProducer:
    """A transactional producer after a newer instance took its id: every transactional call and flush fail."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        raise KafkaException(FENCED)

    def flush(self, timeout: float = 0) -> int:
        self.calls.append("flush")
        raise KafkaException(FENCED)

    def poll(self, timeout: float = 0) -> int:
        return 0


class ClosingConsumer:
    """A consumer whose close runs the revoke callback (as librdkafka does), then fails as `error` says."""

    def __init__(self, pipeline: Pipeline, error: KafkaError | None = None) -> None:
        self.pipeline, self.error, self.closed = pipeline, error, False

    def close(self) -> None:
        self.closed = True
        self.pipeline._on_revoke(self, [TopicPartition("logs", 0)])  # noqa: SLF001 - what close does first
        if self.error is not None:
            raise KafkaException(self.error)


def settings(**overrides: object) -> Settings:
    return Settings(input_topic=["logs"], group_id="g", detector="null", guarantee="exactly-once", **overrides)


def test_fence_reasons_name_who_took_over_and_what_to_do() -> None:
    named = fatal_reason(FENCED, settings(group_instance_id="pod-1"))
    assert "transactional id 'g.pod-1'" in named and "--group-instance-id 'pod-1'" in named
    assert "give each replica its own --group-instance-id" in named
    by_host = fatal_reason(KafkaError(KafkaError.PRODUCER_FENCED), settings())
    assert f"on host {socket.gethostname()!r}" in by_host and "exactly-once uses the host name" in by_host
    member = fatal_reason(MEMBER_FENCED, settings(group_instance_id="pod-1"))
    assert "group 'g' with the same group.instance.id 'pod-1'" in member
    assert fatal_reason(FENCED, settings(), "g.h.repartition").count("'g.h.repartition'") == 1
    fences = (FENCED, MEMBER_FENCED, KafkaError(KafkaError.INVALID_PRODUCER_EPOCH))
    assert all(is_fenced(error) and is_fatal(error) for error in fences)
    assert lost_client_error(LOST) is not None and lost_client_error(SystemError("a bug of ours")) is None
    other = KafkaError(KafkaError._FATAL, "Fatal error: something else", fatal=True)
    assert not is_fenced(other) and "failed for good: Fatal error: something else" in fatal_reason(other, settings())


def test_the_first_fatal_reason_is_kept_unless_a_fence_explains_it() -> None:
    flag = FatalFlag()
    flag.set("fenced: by b")
    flag.set("delivery failed")  # a consequence of the fence
    flag.set("fenced: by c")
    with pytest.raises(FatalPipelineError, match="^fenced: by b$"):
        flag.raise_if_set()
    assert first_cause("Kafka client failed for good: Local: Fatal error", "fenced: by b") == "fenced: by b"
    assert first_cause("delivery to x failed", "delivery to y failed") == "delivery to x failed"


def test_closing_a_fenced_producer_raises_the_operators_sentence_not_a_kafka_error() -> None:
    policy = CommitPolicy(settings(group_instance_id="pod-1"), host=None, producer_config={"transactional.id": "g.x"},
                          stop_event=None)  # type: ignore[arg-type]
    policy.producer = FencedProducer()  # type: ignore[assignment]
    with pytest.raises(FatalPipelineError, match="transactional id 'g.x'"):
        policy.close(clean=True)
    assert policy.producer.calls == ["flush"]
    with pytest.raises(FatalPipelineError, match="took over"):
        policy.close(clean=False)  # the abort is refused for the same reason: no flush after it


class NotFencedProducer(FencedProducer):
    def flush(self, timeout: float = 0) -> int:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT))


def test_a_flush_that_times_out_is_logged_not_raised() -> None:
    policy = CommitPolicy(settings(), host=None, producer_config={}, stop_event=None)  # type: ignore[arg-type]
    policy.producer = NotFencedProducer()  # type: ignore[assignment]
    policy.close(clean=True)


def fenced_run(monkeypatch: pytest.MonkeyPatch, pipeline: Pipeline, consumer_error: KafkaError | None,
               raw: Exception | None = None) -> None:
    """Make `pipeline.run()` meet a fence in its loop, with fenced clients to close: a commit refused
    (FatalPipelineError), or a client call raising `raw` itself (producer.poll, produce, a lost error)."""
    def prepare() -> None:
        pipeline.consumer = ClosingConsumer(pipeline, consumer_error)  # type: ignore[assignment]

    def start() -> None:
        pipeline.policy.producer = FencedProducer()  # type: ignore[assignment]

    def loop() -> int:
        pipeline.parts[("logs", 0)] = object()  # type: ignore[assignment]  # owned: close's revoke must not commit
        if raw is not None:
            raise raw
        raise pipeline.policy._fatal(FENCED)  # noqa: SLF001 - as CommitPolicy.commit raises it

    monkeypatch.setattr(pipeline, "_prepare", prepare)
    monkeypatch.setattr(pipeline, "_start", start)
    monkeypatch.setattr(pipeline, "_loop", loop)
    monkeypatch.setattr(pipeline, "_drop", lambda tps: pipeline.parts.clear())
    monkeypatch.setattr(pipeline.policy, "complete_now", lambda deadline: pytest.fail("committed after the fence"))


@pytest.mark.parametrize("consumer_error,raw", [
    (None, None), (MEMBER_FENCED, None), (None, KafkaException(FENCED)), (None, KafkaException(BARE)), (None, LOST),
], ids=["producer-fenced", "both-fenced", "poll-raises", "produce-raises-bare-fatal", "flush-loses-the-error"])
def test_a_fenced_run_closes_without_raising_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                         consumer_error: KafkaError | None,
                                                         raw: Exception | None) -> None:
    pipeline = Pipeline(settings(group_instance_id="pod-1"), NullDetector())
    fenced_run(monkeypatch, pipeline, consumer_error, raw)
    assert pipeline.run() == 2
    assert pipeline.failure is not None and pipeline.failure.startswith("fenced: another instance started with "
                                                                        "transactional id 'g.pod-1'")
    assert pipeline.consumer.closed and not pipeline.parts  # type: ignore[union-attr]


def test_a_fence_met_only_while_closing_is_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM stop, then the consumer's close finds the member fenced: the close says so, exit 2."""
    pipeline = Pipeline(settings(group_instance_id="pod-1"), NullDetector())
    fenced_run(monkeypatch, pipeline, MEMBER_FENCED)
    monkeypatch.setattr(pipeline, "_loop", lambda: 0)
    monkeypatch.setattr(pipeline.policy, "close", lambda clean: None)
    assert pipeline.run() == 2
    assert "same group.instance.id 'pod-1'" in (pipeline.failure or "")


def test_the_command_prints_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    built: list[Pipeline] = []
    real_init = Pipeline.__init__

    def init(self: Pipeline, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        fenced_run(monkeypatch, self, None)
        built.append(self)

    monkeypatch.setattr(Pipeline, "__init__", init)
    monkeypatch.setattr("logstream.kafka.wait_for_broker", lambda config, timeout: None)
    code = main(["run", "--input-topic", "logs", "--group-id", "g", "--detector", "null", "--guarantee",
                 "exactly-once", "--group-instance-id", "pod-1"])
    err = capsys.readouterr().err
    plain = [line for line in err.splitlines() if not line.startswith("{")]
    assert code == 2 and built and "Traceback" not in err
    assert plain == [f"logstream run: {built[0].failure}"]
    assert '"event":"pipeline_fatal"' in err
