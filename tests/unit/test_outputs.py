"""Output documents fit their size limits by construction; commit metadata round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import orjson
import pytest
from structlog.testing import capture_logs

from logstream.alerts import MAX_LINE_CHARS, OutputTooLarge, build_alert, encode_alert
from logstream.checkpoint import PartitionCut, parse_metadata
from logstream.detectors.novelty import NoveltyDetector
from logstream.detectors.null import NullDetector
from logstream.outputs import fit
from logstream.records import LogLine, Verdict, Window
from logstream.settings import Settings

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "logstream/schemas/alert.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def window_of(texts: list[str]) -> Window:
    lines = [LogLine("t", 0, i, text, text, 1.0e9 + i) for i, text in enumerate(texts)]
    return Window("count", "t/0", "t", 0, lines, "size")


def test_two_lines_of_600_kb_give_a_small_alert_marked_truncated() -> None:
    window = window_of(["a" * 600_000, "b" * 600_000])
    alert = build_alert(window, Verdict(True, 80.0), "novelty", "1")
    value, truncated = encode_alert(alert, 1_000_000)
    doc = orjson.loads(value)
    VALIDATOR.validate(doc)
    assert len(value) < 20_000 and truncated == ["templates", "sample_lines"] == doc["truncated"]
    assert all(t["truncated"] and len(t["template"]) == MAX_LINE_CHARS for t in doc["templates"])
    assert [t["count"] for t in doc["templates"]] == [1, 1] and doc["distinct_templates"] == 2
    assert all(s["truncated"] for s in doc["sample_lines"])


def test_a_whole_alert_is_not_marked() -> None:
    alert = build_alert(window_of(["short line", "another"]), Verdict(False, 1.0), "null", "1")
    value, truncated = encode_alert(alert, 4096)
    assert truncated == [] and "truncated" not in orjson.loads(value)
    assert value == orjson.dumps(alert)


def test_alert_ids_name_the_model(tmp_path: Path) -> None:
    """The same window judged by the same novelty model (saved and loaded again) has the same alert id;
    judged by a model fitted on other lines, another id (a model swapped on a live group)."""
    window = window_of(["a 1", "b 2"])
    first = NoveltyDetector(["a <*>"], source="one")
    first.save(tmp_path / "one.json")
    again = NoveltyDetector.load(tmp_path / "one.json")
    other = NoveltyDetector(["a <*>", "c"], source="two")
    ids = [build_alert(window, detector.judge(window), detector.name, detector.version)["alert_id"]
           for detector in (first, again, other)]
    assert first.version == again.version != other.version and first.version.startswith("1+")
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("limit", [4096, 10_000, 60_000])
def test_many_long_templates_and_evidence_shrink_to_the_limit(limit: int) -> None:
    texts = [f"{chr(97 + i % 26) * (1500 + i)} \" \\ \u00e9" for i in range(300)]
    window = window_of(texts)
    evidence = tuple({"line": i, "reason": "unseen_template", "template": texts[i]} for i in range(300))
    alert = build_alert(window, Verdict(True, 99.0, evidence), "novelty", "1")
    value, truncated = encode_alert(alert, limit)
    doc = orjson.loads(value)
    VALIDATOR.validate(doc)
    assert len(value) <= limit
    assert set(truncated) == {"templates", "sample_lines", "evidence"} == set(doc["truncated"])
    assert doc["templates"] and doc["sample_lines"]  # never empty: the schema needs one of each
    assert doc["distinct_templates"] == 300 and doc["window"]["size"] == 300


def test_what_cannot_fit_even_at_its_minimum_is_refused() -> None:
    alert = build_alert(window_of(["x" * 100]), Verdict(True, 99.0), "novelty", "1")
    with pytest.raises(OutputTooLarge):
        encode_alert(alert, 200)


def test_budget_is_lowered_to_the_topic_limit() -> None:
    assert fit(1_000_000, None) == 1_000_000
    assert fit(1_000_000, 1_048_588) == 1_000_000
    assert fit(2_000_000, 1_048_588) == 1_048_588 - 8192
    assert fit(1_000_000, 6000) == 6000 - 1500
    assert fit(50_000, 1_048_588) == 50_000


def test_metadata_points_at_every_record_of_a_split_snapshot() -> None:
    cut = PartitionCut(10, 20, 3, {"open": [["blk_1", 10]]})
    cut.state_refs = [None, None]
    with pytest.raises(RuntimeError):
        cut.metadata()  # not acknowledged yet
    cut.state_refs = [(0, 5), (2, 9)]
    position = parse_metadata(10, cut.metadata())
    assert position.state_refs == ((0, 5), (2, 9)) and position.fence == 20 and position.snapshot is None
    single = PartitionCut(10, 20, 3, None, [(1, 4)])
    assert orjson.loads(single.metadata())["state"] == [1, 4]  # one record: as earlier versions wrote it
    assert parse_metadata(10, single.metadata()).state_refs == ((1, 4),)
    inline = PartitionCut(10, 20, 3, {"cuts": [15]})
    assert parse_metadata(10, inline.metadata()).snapshot == {"cuts": [15]}
    assert parse_metadata(10, "not ours").state_refs == ()


def test_null_detector_says_it_ignores_a_model(tmp_path: Path) -> None:
    """`--detector null --model X`: the model is not read; the log says so rather than judging silently."""
    with capture_logs() as logs:
        NullDetector.from_settings(Settings(detector="null", model=tmp_path / "model.json"))
        NullDetector.from_settings(Settings(detector="null"))
    assert [entry["event"] for entry in logs] == ["model_ignored"]
