"""Parsing and masking: the NOTES.md example, each format, and what counts as a bad record."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logstream.parsing import BadRecord, LineParser, block_ids, decode_record, mask, parser_for

HDFS_LINE = ("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block "
             "blk_38865049064139660 terminating")
BGL_LINE = ("- 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 "
            "RAS KERNEL INFO instruction cache parity error corrected")
BGL_ALERT = ("KERNDTLB 1118536327 2005.06.11 R30-M0-N9-C:J16-U01 2005-06-11-17.32.07.581048 "
             "R30-M0-N9-C:J16-U01 RAS KERNEL FATAL data TLB error interrupt")
TB_LINE = ("- 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 crond(pam_unix)[2915]: "
           "session closed for user root")


def test_notes_masking_example() -> None:
    line = "Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010"
    assert mask(line) == "Receiving block <*> src: <*> dest: <*>"


@pytest.mark.parametrize(
    ("content", "masked"),
    [
        ("instruction cache parity error corrected", "instruction cache parity error corrected"),
        ("generating core.2275", "generating <*>"),
        ("opened /usr/lib/libfoo.so for read", "opened <*> for read"),
        ("address 0x1f3 is bad", "address <*> is bad"),
        ("checksum deadbeefcafe mismatch", "checksum <*> mismatch"),
        ("", ""),
        ("  spaced   out  7 ", "  spaced   out  <*> "),
    ],
)
def test_masking_rules(content: str, masked: str) -> None:
    assert mask(content) == masked


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_masked_text_has_no_digits_outside_masks(text: str) -> None:
    masked = mask(text)
    assert not any(ch.isdigit() for ch in masked.replace("<*>", "") if ch.isascii())
    assert mask(masked) == masked  # idempotent


def test_block_ids_every_occurrence_once() -> None:
    line = "BLOCK* ask 10.250.14.224:50010 to delete blk_-1 blk_22 blk_-1 blk_333"
    assert block_ids(line) == ("blk_-1", "blk_22", "blk_333")
    assert block_ids("no blocks here") == ()


def test_hdfs() -> None:
    parsed = parser_for("hdfs")(HDFS_LINE)
    assert parsed.content.startswith("PacketResponder 1 for block")
    assert parsed.event_time == 1226262975.0  # 2008-11-09 20:36:15 UTC
    assert parsed.label is None


def test_bgl_normal_alert_and_empty_content() -> None:
    normal = parser_for("bgl")(BGL_LINE)
    assert normal.label is False and normal.content == "instruction cache parity error corrected"
    assert normal.event_time == pytest.approx(1117838570.675872)
    assert parser_for("bgl")(BGL_ALERT).label is True
    empty = parser_for("bgl")("- 1120866516 2005.07.08 R12-M0-N8-C:J12-U01 2005-07-08-16.48.36.430166 "
                              "R12-M0-N8-C:J12-U01 RAS KERNEL FATAL")
    assert empty.content == "" and empty.label is False


@pytest.mark.parametrize("fmt", ["thunderbird", "liberty"])
def test_thunderbird_and_liberty(fmt: str) -> None:
    parsed = parser_for(fmt)(TB_LINE)
    assert parsed.content == "crond(pam_unix)[2915]: session closed for user root"
    assert parsed.event_time == 1131566461.0 and parsed.label is False


def test_generic_with_and_without_timestamp() -> None:
    generic = parser_for("generic")
    stamped = generic("2024-01-02T03:04:05.500Z worker 7 restarted")
    assert stamped.content == "worker 7 restarted" and stamped.event_time == 1704164645.5
    comma = generic("2024-01-02 03:04:05,123 x")
    assert comma.event_time == pytest.approx(1704164645.123)
    plain = generic("no timestamp here")
    assert plain.content == "no timestamp here" and plain.event_time is None


@pytest.mark.parametrize(
    ("fmt", "line"),
    [("hdfs", "not an hdfs line"), ("bgl", "- 123 too short"), ("bgl", "- notatime a b c d e f g h content"),
     ("thunderbird", "- 1 2"), ("bgl", HDFS_LINE), ("thunderbird", HDFS_LINE + " extra words here"),
     ("bgl", "- 1117838570 05.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO text")],
)
def test_wrong_format_is_a_bad_record(fmt: str, line: str) -> None:
    with pytest.raises(BadRecord) as excinfo:
        LineParser(fmt).parse(line.encode(), topic="t", partition=0, offset=0, record_time=0.0)
    assert excinfo.value.reason == "unparseable"


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"", "empty"), (None, "empty"), (b"  \r\n", "empty"), (b"\xff\xfe bad", "undecodable"),
     ("caf\u00e9".encode()[:-1], "undecodable"), (b"a\x00b", "control_characters"), (b"x" * 2000, "too_large")],
)
def test_bad_bytes(value: bytes | None, reason: str) -> None:
    with pytest.raises(BadRecord) as excinfo:
        decode_record(value, max_bytes=1000)
    assert excinfo.value.reason == reason


def test_line_terminators_and_multiline_records() -> None:
    assert decode_record(b"abc\r\n", 100) == "abc"
    assert decode_record(b"abc\n", 100) == "abc"
    assert decode_record(b"trace:\n  at x\n", 100) == "trace:\n  at x"


def test_record_time_stands_in_for_missing_line_time() -> None:
    line = LineParser("generic").parse(b"hello 42", topic="t", partition=3, offset=9, record_time=99.5)
    assert (line.event_time, line.template, line.partition, line.offset) == (99.5, "hello <*>", 3, 9)


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        parser_for("syslog")


def test_input_topics_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from logstream.settings import Settings

    for text, topics in [("logs.raw", ["logs.raw"]), ("a, b", ["a", "b"]), ('["x", "y"]', ["x", "y"])]:
        monkeypatch.setenv("LOGSTREAM_INPUT_TOPIC", text)
        assert Settings().input_topic == topics
