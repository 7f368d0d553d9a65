"""Operator mistakes refused at start, without a broker: illegal topic names and group ids, outputs that
are inputs, --kafka-option keys logstream manages, configurations librdkafka refuses, unknown
LOGSTREAM_* variables. Each refusal is one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from logstream.cli import main
from logstream.cliargs import warn_unknown_environment
from logstream.kafka import client_config, consumer_config, producer_config
from logstream.logs import configure_logging
from logstream.settings import MANAGED_KAFKA_OPTIONS, Settings, kafka_name_problem, unknown_environment
from trainer.cli import main as train_main

# Keys kafka.py sets that an operator may tune with --kafka-option (everything else it sets is managed).
TUNABLE_KAFKA_OPTIONS = {
    "log.connection.close", "reconnect.backoff.ms", "reconnect.backoff.max.ms", "topic.metadata.refresh.interval.ms",
    "linger.ms", "compression.type", "transaction.timeout.ms", "message.timeout.ms",
    "auto.offset.reset",  # where a new group starts: earliest by default, latest to skip the history
}


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No LOGSTREAM_* variable of the machine leaks in; the suite's logging is put back after each command."""
    for name in [n for n in os.environ if n.upper().startswith("LOGSTREAM_")]:
        monkeypatch.delenv(name)
    yield
    configure_logging(os.environ.get("LOGSTREAM_TEST_LOG_LEVEL", "WARNING"))


def refused(field: str, value: object, **others: object) -> str:
    """The message of the ValidationError `Settings(field=value)` raises."""
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value}, **others)
    return "; ".join(error["msg"] for error in caught.value.errors())


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], command=main) -> str:  # noqa: ANN001
    """Run a command in-process: it must exit 2 with exactly one line on stderr and no traceback."""
    assert command(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# --- names -----------------------------------------------------------------------------------------


def test_kafka_name_rule() -> None:
    assert kafka_name_problem("logs.raw_2-b") is None
    assert kafka_name_problem("") == "is empty"
    assert kafka_name_problem("..") == "is not allowed"
    assert "at most 249" in kafka_name_problem("a" * 250)
    assert "' ', '!'" in kafka_name_problem("bad topic!")
    assert kafka_name_problem("a" * 249) is None


@pytest.mark.parametrize("field", ["alerts_topic", "dlq_topic", "state_topic", "repartition_topic"])
@pytest.mark.parametrize("bad", ["", "bad topic!", "x" * 250, "."])
def test_every_topic_setting_takes_legal_names_only(field: str, bad: str) -> None:
    assert "topic name" in refused(field, bad)


def test_input_topics_group_and_instance_ids() -> None:
    assert "topic name '' is empty" in refused("input_topic", ["logs", ""])
    assert "is empty" in refused("group_id", "")
    assert "group.instance.id '' is empty" in refused("group_instance_id", "")
    assert "has characters" in refused("group_instance_id", "pod 0")
    assert "is empty" in refused("bootstrap_servers", " ")
    # the state topic derives from the group id: a group Kafka takes that makes an illegal topic is named
    assert "--state-topic" in refused("group_id", "my group")
    assert Settings(group_id="my group", state_topic="my-group.state").resolved_state_topic == "my-group.state"
    assert Settings(input_topic=["a", "b"], group_instance_id="pod-0").static_member_id == "pod-0"


# --- outputs and inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,flag", [("alerts_topic", "--alerts-topic"), ("dlq_topic", "--dlq-topic"),
                                        ("state_topic", "--state-topic")])
def test_an_output_topic_that_is_an_input_topic_is_refused(field: str, flag: str) -> None:
    message = refused(field, "logs.raw", input_topic=["other", "logs.raw"])
    assert f"{flag} 'logs.raw' is also an --input-topic" in message and "without end" in message


def test_the_derived_state_topic_and_outputs_sharing_a_topic_are_refused() -> None:
    assert "--state-topic 'g.logstream-state'" in refused("input_topic", ["g.logstream-state"], group_id="g")
    assert "--alerts-topic and --dlq-topic are the same topic 'out'" in refused("alerts_topic", "out", dlq_topic="out")
    assert "--dlq-topic and --state-topic" in refused("dlq_topic", "s", state_topic="s")


def test_repartition_topic_is_checked_by_the_command_that_writes_it() -> None:
    shared = Settings(input_topic=["logs.by-block"], repartition_topic="logs.by-block")  # run reads it: fine
    assert "re-read every line it writes" in shared.repartition_problem()
    assert Settings(input_topic=["logs.raw"], repartition_topic="logs.by-block").repartition_problem() is None
    assert "required" in Settings(input_topic=["logs.raw"]).repartition_problem()


# --- kafka options -----------------------------------------------------------------------------------


def test_managed_kafka_options_cover_what_logstream_sets() -> None:
    settings = Settings(guarantee="exactly-once", group_instance_id="r-0")
    configs = [client_config(settings.bootstrap_servers), consumer_config(settings), producer_config(settings)]
    managed = {key for config in configs for key in config} - TUNABLE_KAFKA_OPTIONS
    assert managed <= set(MANAGED_KAFKA_OPTIONS), managed - set(MANAGED_KAFKA_OPTIONS)


@pytest.mark.parametrize("key", ["group.id", "enable.auto.commit", "isolation.level", "transactional.id",
                                 "group.instance.id", "enable.idempotence", "bootstrap.servers"])
def test_kafka_options_logstream_sets_itself_are_refused(key: str) -> None:
    assert f"{key} is set by logstream itself" in refused("kafka_option", {key: "x"})


def test_security_and_tuning_options_pass_and_env_json_becomes_text(monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN", "ssl.ca.location": "/ca.pem",
               "linger.ms": "10", "topic.metadata.refresh.interval.ms": "5000"}
    assert Settings(kafka_option=options).kafka_option == options
    monkeypatch.setenv("LOGSTREAM_KAFKA_OPTION", '{"linger.ms": 10, "enable.ssl.certificate.verification": false}')
    assert Settings().kafka_option == {"linger.ms": "10", "enable.ssl.certificate.verification": "false"}
    monkeypatch.setenv("LOGSTREAM_KAFKA_OPTION", "")
    assert Settings().kafka_option == {}
    monkeypatch.setenv("LOGSTREAM_KAFKA_OPTION", '["linger.ms"]')
    with pytest.raises(ValidationError, match="must be a JSON object"):
        Settings()


def test_log_level_and_poll_interval() -> None:
    assert "'LOUD' is not a log level" in refused("log_level", "LOUD")
    assert Settings(log_level="debug").log_level == "DEBUG"
    assert "must not be below session_timeout_ms" in refused("max_poll_interval_ms", 5000, session_timeout_ms=6000)


# --- the command line ----------------------------------------------------------------------------------

RUN = ["run", "--input-topic", "logs.raw", "--detector", "null", "--bootstrap-servers", "127.0.0.1:1"]


@pytest.mark.parametrize("extra,expected", [
    (["--group-id", ""], "group_id (--group-id, LOGSTREAM_GROUP_ID): is empty"),
    (["--alerts-topic", ""], "alerts_topic (--alerts-topic, LOGSTREAM_ALERTS_TOPIC): topic name '' is empty"),
    (["--input-topic", "bad topic!"], "has characters Kafka does not allow"),
    (["--log-level", "LOUD"], "'LOUD' is not a log level"),
    (["--dlq-topic", "logs.raw"], "--dlq-topic 'logs.raw' is also an --input-topic"),
    (["--alerts-topic", "logs.raw", "--emit", "all"], "--alerts-topic 'logs.raw' is also an --input-topic"),
    (["--kafka-option", "group.id=other"], "group.id is set by logstream itself (use --group-id)"),
    (["--kafka-option", "bogus.key=1"], 'No such configuration property: "bogus.key"'),
    (["--kafka-option", "fetch.min.bytes=lots"], 'Invalid value for configuration property "fetch.min.bytes"'),
    # refused by the transactional producer only (message.timeout.ms is 110 s): built and dropped at start
    (["--guarantee", "exactly-once", "--kafka-option", "transaction.timeout.ms=1000"], "transaction.timeout.ms"),
])
def test_run_refuses_bad_configuration_in_one_line(capsys: pytest.CaptureFixture[str], extra: list[str],
                                                    expected: str) -> None:
    err = one_line_exit_2(capsys, [*RUN, *extra])
    assert err.startswith("logstream run: ") and expected in err


def test_bad_kafka_option_variable_is_one_line(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGSTREAM_KAFKA_OPTION", "notjson")
    err = one_line_exit_2(capsys, RUN)
    assert "kafka_option (--kafka-option, LOGSTREAM_KAFKA_OPTION): is not JSON" in err


def test_other_commands_refuse_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    log = tmp_path / "lines.log"
    log.write_text("a line\n")
    err = one_line_exit_2(capsys, ["repartition", "--input-topic", "logs", "--repartition-topic", "logs"])
    assert "--repartition-topic 'logs' is also an --input-topic" in err
    err = one_line_exit_2(capsys, ["repartition", "--input-topic", "logs", "--repartition-topic", "by-block",
                                   "--kafka-option", "bogus.key=1"])
    assert "bogus.key" in err
    assert "--topic '' is empty" in one_line_exit_2(capsys, ["alerts", "--bootstrap-servers", "b:1", "--topic", ""])
    assert "has characters" in one_line_exit_2(capsys, ["produce", "--bootstrap-servers", "b:1", "--topic", "a b",
                                                        "--file", str(log)])
    err = one_line_exit_2(capsys, ["evaluate", "--dataset", "bgl", "--model", "novelty", "--logs", str(log),
                                   "--report", str(tmp_path / "report"), "--log-level", "LOUD"], command=train_main)
    assert err.startswith("logstream-train evaluate: invalid settings: log_level")


# --- unknown LOGSTREAM_* variables -------------------------------------------------------------------


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    environ = {"LOGSTREAM_WINDOW_SIZ": "50", "LOGSTREAM_GROUPID": "typo", "LOGSTREAM_WINDOW_SIZE": "50",
               "logstream_emit": "all", "LOGSTREAM_TEST_WORKERS": "0", "LOGSTREAM_TEST_LOG_LEVEL": "INFO",
               "LOGSTREAM_XYZZY": "1", "PATH": "/bin"}
    assert unknown_environment(environ) == [("LOGSTREAM_GROUPID", "LOGSTREAM_GROUP_ID"),
                                            ("LOGSTREAM_WINDOW_SIZ", "LOGSTREAM_WINDOW_SIZE"),
                                            ("LOGSTREAM_XYZZY", None)]
    with capture_logs() as logs:
        warn_unknown_environment({"LOGSTREAM_WINDOW_SIZ": "50", "LOGSTREAM_TEST_WORKERS": "0"})
    assert logs == [{"event": "unknown_environment_variable", "log_level": "warning",
                     "variable": "LOGSTREAM_WINDOW_SIZ", "did_you_mean": "LOGSTREAM_WINDOW_SIZE",
                     "effect": "ignored: not a logstream setting"}]


def test_every_logstream_variable_the_repository_reads_is_a_setting_or_allowed() -> None:
    """Names such as LOGSTREAM_TEST_WORKERS (scripts/test.sh) must stay quiet: the allowlist keeps up with the
    scripts, tests and deployments that set or read variables (the README names a typo on purpose)."""
    root = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for path in [*root.glob("scripts/*"), *root.glob(".ci/*"), *root.glob("tests/**/*.py"), *root.glob("deploy/**/*"),
                 *root.glob("bench/*.py")]:
        if path.is_file() and path.name != Path(__file__).name:
            names.update(re.findall(r"\bLOGSTREAM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    assert unknown_environment(dict.fromkeys(names, "")) == []
