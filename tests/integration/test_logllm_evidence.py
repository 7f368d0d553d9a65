"""Evidence for LogLLM verdicts on the real embedded models and the shipped BGL artifact.

Normal windows cost no extra forward pass; anomalous ones name their lines (offset, template,
count, contribution, method) and the alert's sample lines start from them; on the demo sample the
first evidence line of most true-positive alerts is an alert-tagged line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from logstream.attribution import REASON
from logstream.detectors.logllm import LogLLMDetector
from logstream.records import LogLine, Window
from logstream.settings import Settings
from logstream.tail import format_alert
from tests.kafkatools import SAMPLES, create_topic, make_settings, produce_lines, read_alerts, run_once, unique
from tests.logllm_tools import file_windows

SHIPPED = SAMPLES / "logllm-bgl"
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "logstream/schemas/alert.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def shipped(model_cache_dir: Path) -> LogLLMDetector:
    return LogLLMDetector.from_settings(Settings(detector="logllm", model=SHIPPED, cache_dir=model_cache_dir))


def twin(detector: LogLLMDetector, evidence: str | None) -> LogLLMDetector:
    """Another detector on the same loaded model, empty caches, evidence by `evidence` (None: off)."""
    return LogLLMDetector(detector.model, embedding_cache_size=1000, verdict_cache_size=1000,
                          evidence=evidence)  # type: ignore[arg-type]


class ForwardCounter:
    """Counts LLM forward calls and the rows they carried (hooked on the decoder itself)."""

    def __init__(self, detector: LogLLMDetector) -> None:
        self.calls = 0
        self.rows = 0
        self._hook = detector.model.llm.register_forward_hook(self._count)

    def _count(self, _module: Any, _args: Any, output: Any) -> None:
        self.calls += 1
        self.rows += int(output.logits.shape[0])

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._hook.remove()


def test_normal_windows_cost_no_extra_forward_pass(shipped: LogLLMDetector) -> None:
    windows = file_windows(SAMPLES / "BGL_2k.log", "bgl", size=20)[:20]  # 10 of them alert-tagged: both verdicts
    normal = [w for w in twin(shipped, None).score(windows) if not w.anomalous]
    assert normal, "the sample has windows the model calls normal"
    method = shipped.attributor.method if shipped.attributor else "occlusion"
    counts = {}
    verdicts = {}
    for evidence in (None, method):
        detector = twin(shipped, evidence)
        with ForwardCounter(detector) as counter:
            verdicts[evidence] = detector.score(windows)
        counts[evidence] = (counter.calls, counter.rows)
    judged_normal = [i for i, v in enumerate(verdicts[None]) if not v.anomalous]
    judged_anomalous = [i for i, v in enumerate(verdicts[None]) if v.anomalous]
    # identical verdicts; with evidence on, the extra rows are exactly those of the anomalous windows
    assert [(v.anomalous, v.score) for v in verdicts[method]] == [(v.anomalous, v.score) for v in verdicts[None]]
    assert all(not verdicts[method][i].evidence for i in judged_normal)
    assert all(verdicts[method][i].evidence for i in judged_anomalous)
    only_normal = [windows[i] for i in judged_normal]
    with ForwardCounter(shipped) as counter:
        twin(shipped, method).score(only_normal)
    with_evidence = (counter.calls, counter.rows)
    with ForwardCounter(shipped) as counter:
        twin(shipped, None).score(only_normal)
    assert with_evidence == (counter.calls, counter.rows)  # normal windows: not one extra forward or row
    assert counts[method][1] > counts[None][1] if judged_anomalous else counts[method] == counts[None]


def test_a_cached_verdict_names_the_lines_of_the_window_it_is_given(shipped: LogLLMDetector) -> None:
    """The ranking is cached with the verdict; line indices, offsets and counts are the new window's own."""
    window = next(w for w in file_windows(SAMPLES / "BGL_2k.log", "bgl", size=100)
                  if shipped.score([w])[0].anomalous and len(set(w.templates)) > 1)
    shifted = Window("count", "other/0", "other", 0, [
        LogLine("other", 0, 5000 + line.offset, line.raw, line.template, line.event_time, line.label)
        for line in window.lines], "size")
    detector = twin(shipped, shipped.attributor.method if shipped.attributor else "occlusion")
    first, again = detector.score([window])[0], detector.score([shifted])[0]
    assert detector.judged == 1 and detector.attributed == 1  # the second window came from the cache
    assert [e["template"] for e in first.evidence] == [e["template"] for e in again.evidence]
    for a, b in zip(first.evidence, again.evidence):
        assert b["offset"] == a["offset"] + 5000  # the same line of the other window, at its own offset
        assert window.lines[a["line"]].template == a["template"] and a["line"] == b["line"]
        assert a["count"] == window.templates.count(a["template"])
        assert a["reason"] == REASON and a["method"] == detector.attributor.method  # type: ignore[union-attr]
    contributions = [e["contribution"] for e in first.evidence]
    assert contributions == sorted(contributions, reverse=True)


def test_demo_sample_alerts_lead_with_alert_tagged_lines(bootstrap: str, shipped: LogLLMDetector,
                                                        model_cache_dir: Path) -> None:
    """Through the pipeline: every anomalous alert names lines, leads its samples with them, fits the schema;
    the first evidence line of true-positive alerts is alert-tagged (BGL first field != '-') in most of them
    (more than half; bench/RESULTS.md: evidence for LogLLM verdicts)."""
    raw = (SAMPLES / "BGL_2k.log").read_bytes().splitlines()
    topic = unique("evidence")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, raw)
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=100, detector="logllm",
                             model=SHIPPED, cache_dir=model_cache_dir, emit="anomalous", batch_size=1)
    assert run_once(settings) == 0
    alerts = read_alerts(bootstrap, f"{topic}.alerts")
    assert alerts, "the shipped model flags some windows of its demo sample"
    tagged = [not line.startswith(b"- ") for line in raw]  # offset == line number: one partition, from 0
    true_positive = []
    for alert in alerts:
        VALIDATOR.validate(alert)
        evidence = alert["evidence"]
        assert evidence and all(e["reason"] == REASON for e in evidence)
        assert alert["sample_lines"][0]["offset"] == evidence[0]["offset"]  # evidence leads the sample lines
        assert REASON in format_alert(alert)
        source = alert["source"]
        if any(tagged[source["first_offset"]:source["last_offset"] + 1]):
            true_positive.append(tagged[evidence[0]["offset"]])
    assert true_positive, "some alerts are true positives"
    assert sum(true_positive) > len(true_positive) / 2, true_positive
