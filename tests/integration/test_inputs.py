"""Production input through the real broker: byte-order marks, CRLF records and lines without a time.

A novelty model fitted on a CRLF file raises nothing when the same file is streamed split on `\\n`
(every record ending in `\\r`, the first one opening with a BOM); stack-trace continuation lines
keep the incident's time in the alert instead of the Kafka record time.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from logstream.cli import main as logstream_main
from tests.kafkatools import create_topic, make_settings, produce_lines, read_alerts, read_topic, run_once, unique

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "logstream/schemas/alert.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
APP_LOG = [
    b"2024-01-02T09:01:58.120Z INFO web-frontend cache warm complete",
    b"Jan  2 09:01:59 web-1 nginx[812]: worker process started",
    b"2024-01-02 09:02:00,004 ERROR [pool-3] c.e.Checkout - payment failed",
    b"java.lang.IllegalStateException: gateway timeout",
    b"    at com.example.Gateway.call(Gateway.java:88)",
    b"    at com.example.Checkout.pay(Checkout.java:41)",
    b"[02/Jan/2024:09:02:01 +0000] GET /health 200",
    b"1704186121 batch job finished",
]


def test_novelty_fitted_on_a_crlf_file_is_quiet_on_the_same_lines_streamed(bootstrap: str, tmp_path: Path) -> None:
    log_file = tmp_path / "app.log"
    log_file.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(APP_LOG) + b"\r\n")
    model = tmp_path / "novelty.json"
    assert logstream_main(["novelty", "fit", "--format", "generic", "--input", str(log_file),
                           "--output", str(model)]) == 0

    topic = unique("crlf")
    create_topic(bootstrap, topic)
    records = [record for record in log_file.read_bytes().split(b"\n") if record]  # a shipper splitting on \n
    assert records[0].startswith(b"\xef\xbb\xbf") and all(record.endswith(b"\r") for record in records)
    produce_lines(bootstrap, topic, records * 3)
    settings = make_settings(bootstrap, topic, format="generic", window="count", window_size=4, detector="novelty",
                             model=model, emit="anomalous")
    assert run_once(settings) == 0
    assert read_alerts(bootstrap, settings.alerts_topic, idle_s=1.0) == []
    assert read_topic(bootstrap, settings.dlq_topic, idle_s=1.0) == []

    # the detector is live: a line it has not seen is an alert
    produce_lines(bootstrap, topic, [b"2024-01-02T09:05:00Z FATAL disk full on /var\r"])
    assert run_once(settings) == 0
    alerts = read_alerts(bootstrap, settings.alerts_topic, idle_s=1.0)
    assert len(alerts) == 1 and alerts[0]["verdict"]["label"] == "anomalous"


def test_continuation_lines_keep_the_incident_time_in_the_alert(bootstrap: str) -> None:
    topic = unique("trace")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, APP_LOG[2:6])  # the records' own Kafka times are now, years later
    settings = make_settings(bootstrap, topic, format="generic", window="count", window_size=4)
    assert run_once(settings) == 0
    alerts = read_alerts(bootstrap, settings.alerts_topic, idle_s=1.0)
    assert len(alerts) == 1
    VALIDATOR.validate(alerts[0])
    assert alerts[0]["event_time"] == {"first": "2024-01-02T09:02:00.004000Z", "last": "2024-01-02T09:02:00.004000Z",
                                       "inherited_lines": 3}
