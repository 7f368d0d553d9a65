"""A detector served on logs it was not trained for says so: warning + metric, through the real pipeline."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from logstream.metrics import Metrics
from tests.kafkatools import SAMPLES, create_topic, make_settings, produce_lines, run_once, unique


def sample_value(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_bgl_model_on_application_logs_warns_naming_its_dataset(bootstrap: str) -> None:
    topic = unique("coverage")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, (SAMPLES / "HDFS_2k.log").read_bytes().splitlines())  # not BGL
    metrics = Metrics()
    settings = make_settings(bootstrap, topic, format="generic", window="count", window_size=100,
                             detector="novelty", model=SAMPLES / "bgl-novelty.json")
    with capture_logs() as logs:
        assert run_once(settings, metrics) == 0
    assert sample_value(metrics, "logstream_unseen_template_warnings_total") == 1
    assert sample_value(metrics, "logstream_unseen_template_share") > 0.99
    assert sample_value(metrics, "logstream_unseen_template_alarm_share") == pytest.approx(0.75, abs=0.01)
    warnings = [entry for entry in logs if entry["event"] == "unseen_templates_high"]
    assert len(warnings) == 1 and warnings[0]["dataset"].endswith("BGL_train_sample.log")


def test_the_model_on_its_own_kind_of_logs_stays_quiet(bootstrap: str) -> None:
    topic = unique("coverage-ok")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, (SAMPLES / "BGL_2k.log").read_bytes().splitlines())
    metrics = Metrics()
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=100,
                             detector="novelty", model=SAMPLES / "bgl-novelty.json")
    assert run_once(settings, metrics) == 0
    assert sample_value(metrics, "logstream_unseen_template_warnings_total") == 0
    assert 0 < sample_value(metrics, "logstream_unseen_template_share") < 0.5  # anomalies, not another system
