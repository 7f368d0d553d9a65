"""The consumer's per-record parse path gives exactly what the public building blocks give.

`LineParser` takes shortcuts for speed (formats as tuples, a content -> template cache, LogLine
built slot by slot); these tests hold it to the plain composition of `decode_record`, the format's
public parser, `mask` and `LogLine(...)`, on real lines and on generated ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstream import parsing
from logstream.parsing import BadRecord, LineParser, block_ids, decode_record, mask, parse_generic, parser_for
from logstream.records import LogLine

FORMATS = ["hdfs", "bgl", "thunderbird", "liberty", "generic"]
SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"


def reference(fmt: str, value: bytes, offset: int, max_bytes: int = 1_048_576,
              last: dict[str, float] | None = None) -> LogLine | tuple[str, str]:
    """The plain composition; `last` carries the last stamped time between calls (time inheritance)."""
    try:
        text = decode_record(value, max_bytes)
        parsed = parse_generic(text, reference=5.0) if fmt == "generic" else parser_for(fmt)(text)
    except BadRecord as exc:
        return exc.reason, exc.detail
    memory = last if last is not None else {}
    if parsed.event_time is not None:
        memory["time"] = event_time = parsed.event_time
        source = "line"
    elif "time" in memory:
        event_time, source = memory["time"], "inherited"
    else:
        event_time, source = 5.0, "record"
    return LogLine(topic="t", partition=2, offset=offset, raw=text, template=mask(parsed.content),
                   event_time=event_time, label=parsed.label, block_ids=block_ids(text), time_source=source)


def fast(parser: LineParser, value: bytes, offset: int) -> LogLine | tuple[str, str]:
    try:
        return parser.parse(value, topic="t", partition=2, offset=offset, record_time=5.0)
    except BadRecord as exc:
        return exc.reason, exc.detail


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_samples_parse_as_the_reference_does(fmt: str) -> None:
    for sample in ("HDFS_2k.log", "BGL_2k.log"):
        parser, last = LineParser(fmt), {}
        for offset, value in enumerate((SAMPLES / sample).read_bytes().splitlines(keepends=True)):
            assert fast(parser, value, offset) == reference(fmt, value, offset, last=last)


TOKENS = st.sampled_from([
    " ", "  ", "\t", "\r", "\n", "\x0b", "\x1e", "\x00", "\x7f", "\xa0", "\u3000", "/", ":", ".", "-",
    "blk_-42", "blk_7", "0", "17", "deadbeefcafe", "DEADBEEF", "abc", "é", "٣", "<*>",
    "081109 203615 148 INFO dfs.X: ",
    "- 1117838570 2005.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO ",
    "APP 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 ", "2024-01-02T03:04:05.5+01:00 ",
    "\ufeff", "\r\n", "Nov  3 04:12:01 ", "Feb 29 00:00:00 ", "<34>1 2003-10-11T22:14:15.003Z ",
    "[10/Oct/2000:13:55:36 -0700] ", "1700000000123 ", "1700000000.5 ", "2024/01/02 03:04:05 ",
    "[Wed Oct 11 14:32:52.123456 2000] ", "2024-13-45 25:61:61,1 ",
])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FORMATS),
       st.lists(st.lists(TOKENS, max_size=25).map("".join), min_size=1, max_size=30), st.binary(max_size=8))
def test_generated_records_parse_as_the_reference_does(fmt: str, texts: list[str], junk: bytes) -> None:
    parser = LineParser(fmt)  # one parser for the whole list: repeated contents come from its cache
    last: dict[str, float] = {}
    for offset, text in enumerate(texts + texts):
        for value in (text.encode(), text.encode() + junk):
            assert fast(parser, value, offset) == reference(fmt, value, offset, last=last)
            short = LineParser(fmt, max_line_bytes=64)  # a fresh parser: nothing to inherit
            assert fast(short, value, offset) == reference(fmt, value, offset, max_bytes=64)


def test_template_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "TEMPLATE_CACHE_ENTRIES", 10)
    parser = LineParser("generic")
    for i in range(95):
        value = f"event {i % 37} at node{i}".encode()
        line = parser.parse(value, topic="t", partition=0, offset=i, record_time=0)
        assert line.template == "event <*> at <*>"
        assert len(parser._templates) <= 10
    long_content = "x " * (parsing.TEMPLATE_CACHE_MAX_CHARS + 1)
    parser.parse(long_content.encode(), topic="t", partition=0, offset=99, record_time=0)
    assert long_content not in parser._templates


def test_lines_are_immutable_named_tuples() -> None:
    parser = LineParser("hdfs")
    record = b"081109 203615 148 INFO dfs.DataNode: Received block blk_1 of size 67108864"
    line = parser.parse(record, topic="t", partition=0, offset=3, record_time=0.0)
    assert type(line) is LogLine and line.block_ids == ("blk_1",)
    with pytest.raises(AttributeError):
        line.offset = 4  # type: ignore[misc]
    assert hash(line) == hash(line._replace()) and line._replace(offset=4).offset == 4
    batch = parser.parse_batch([record] * 40, topic="t", partition=0, offsets=range(3, 43), record_times=[0.0] * 40)
    assert batch[0] == line and all(type(made) is LogLine for made in batch)
