"""Differential: `LineParser.parse_batch` gives, record for record, what `parse` gives one at a time.

Over every line of every shared sample (each file read in the format it is written in, and as
generic text) and over generated records, good and bad (empty, too large, undecodable, control
characters, byte-order marks, line endings, broken headers, non-ASCII digits), split into consume
batches of uneven sizes: the same fields, templates, block ids, event times and time sources, and
the same dead-letter reason and detail in the place of each bad record. Batches of the fixed-header
formats go through the batch path (`logstream.batchparse`); generated records built to sit on
either side of its plain shapes check its edges.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.batchparse import BatchParser
from logstream.masking import block_ids, mask
from logstream.parsing import BadRecord, LineParser
from logstream.records import LogLine
from tests.hardening_inputs import CLOCK_AHEAD_HDFS

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"
FORMATS = ["hdfs", "bgl", "thunderbird", "liberty", "generic"]
NATIVE = {"BGL": "bgl", "HDFS": "hdfs", "Thunderbird": "thunderbird", "Liberty": "liberty"}

Outcome = LogLine | tuple[str, str]


def one_by_one(parser: LineParser, values: list[bytes | None], record_times: list[float]) -> list[Outcome]:
    out: list[Outcome] = []
    for offset, (value, record_time) in enumerate(zip(values, record_times)):
        try:
            out.append(parser.parse(value, topic="t", partition=3, offset=offset, record_time=record_time))
        except BadRecord as exc:
            out.append((exc.reason, exc.detail))
    return out


def batched(parser: LineParser, values: list[bytes | None], record_times: list[float],
            sizes: list[int]) -> list[Outcome]:
    out: list[Outcome] = []
    start, turn = 0, 0
    while start < len(values):
        end = start + sizes[turn % len(sizes)]
        turn += 1
        results = parser.parse_batch(values[start:end], topic="t", partition=3,
                                     offsets=range(start, min(end, len(values))), record_times=record_times[start:end])
        out += [(r.reason, r.detail) if isinstance(r, BadRecord) else r for r in results]
        start = end
    return out


def sample_files() -> list[tuple[Path, str]]:
    """(file, its own format) for every shared sample (CSV exports and label files: generic text), and
    the shipped 2k samples."""
    files = [(path, NATIVE.get(path.parent.name, "generic") if path.suffix == ".log" else "generic")
             for path in sorted(SHARED_DATA.glob("*/*")) if path.is_file() and path.name != "README.md"]
    files += [(SAMPLES / "HDFS_2k.log", "hdfs"), (SAMPLES / "BGL_2k.log", "bgl")]
    return files


def record_times_for(n: int) -> list[float]:
    """Kafka timestamps as they come: mostly set, some missing (0), for time inheritance and `record`."""
    return [0.0 if i % 7 == 0 else 1_700_000_000.0 + i for i in range(n)]


@pytest.mark.parametrize("path,fmt", [pytest.param(p, f, id=f"{p.parent.name}/{p.name}") for p, f in sample_files()])
def test_every_shared_sample_line(path: Path, fmt: str) -> None:
    if not path.is_file():
        pytest.skip(f"{path} not present")
    values: list[bytes | None] = list(path.read_bytes().splitlines(keepends=True))
    for chosen in dict.fromkeys([fmt, "generic"]):
        # the generic reading of a large dump: its head is enough
        values_used = values[:20_000] if chosen == "generic" and chosen != fmt else values
        times = record_times_for(len(values_used))
        expected = one_by_one(LineParser(chosen), values_used, times)
        assert batched(LineParser(chosen), values_used, times, [500, 1, 37, 4096]) == expected
        assert any(isinstance(o, LogLine) for o in expected) or chosen != fmt


TEXT = st.sampled_from([
    " ", "  ", "\t", "\r", "\n", "\r\n", "\x0b", "\x1e", "\x00", "\x7f", "\xa0", "\u3000", "/", ":", ".", "-",
    "blk_-42", "blk_7", "blk_7 blk_7", "0", "17", "deadbeefcafe", "DEADBEEF", "abc", "é", "٣", "<*>", "\ufeff",
    "081109 203615 148 INFO dfs.X: ", "081399 203615 148 INFO dfs.X: ", "081109 2036 148 INFO dfs.X:",
    "- 1117838570 2005.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO ",
    "KERNDTLB 1117838570 2005.06.03 R02 2005-06-03-15.42.50.67587 R02 RAS KERNEL FATAL ",
    "- 1117838570 2005.06.0٣ R02 x R02 RAS KERNEL INFO ", "- 11178385٧0 2005.06.03 R02 x R02 RAS KERNEL INFO ",
    "- 1117838570 2005-06-03 R02 x R02 RAS KERNEL INFO ", "- 1117838570 2005.06.03\n ",
    "APP 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 ", "2024-01-02T03:04:05.5+01:00 ",
    "Nov  3 04:12:01 ", "<34>1 2003-10-11T22:14:15.003Z ", "[10/Oct/2000:13:55:36 -0700] ", "1700000000123 ",
])
RECORD = st.one_of(
    st.lists(TEXT, max_size=20).map(lambda parts: "".join(parts).encode()),
    st.binary(max_size=40),
    st.just(b""),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FORMATS), st.lists(RECORD, min_size=1, max_size=60),
       st.lists(st.integers(1, 9), min_size=1, max_size=5), st.sampled_from([64, 1_048_576]))
def test_generated_records_good_and_bad(fmt: str, values: list[bytes | None], sizes: list[int],
                                        max_bytes: int) -> None:
    times = record_times_for(len(values))
    values = values + values  # repeats come from the template cache the second time
    times = times + times
    expected = one_by_one(LineParser(fmt, max_bytes), values, times)
    assert batched(LineParser(fmt, max_bytes), values, times, sizes) == expected
    # every batch through the batch path (batchparse), whatever its size
    assert batched(LineParser(fmt, max_bytes, vector_min=1), values, times, sizes) == expected


@pytest.mark.parametrize("limit", [2**31 - 1, 2**31, 2**63, 2**80])
def test_any_record_size_limit(limit: int) -> None:
    """A size limit beyond what a batch can hold (a 64-bit integer and more) is no limit, on both paths."""
    values: list[bytes | None] = [b"081109 203615 148 INFO dfs.X: a 1 blk_7"] * 40
    times = record_times_for(len(values))
    expected = one_by_one(LineParser("hdfs", limit), values, times)
    assert batched(LineParser("hdfs", limit), values, times, [40]) == expected


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 values, 1 offsets"):
        LineParser("bgl").parse_batch([b"a", b"b"], topic="t", partition=0, offsets=[0], record_times=[0.0, 0.0])


# --- the batch path (logstream.batchparse) ----------------------------------------------------------

DIGITS = st.text("0123456789", min_size=1, max_size=17)
FIELD = st.sampled_from(["R02", "RAS", "KERNEL", "INFO", "-", "APPERR", "x.y", "a:b", "dfs.DataNode$X",
                         "2005-06-03-15.42.50.675872", "15.42.50.67587", "123456", "1.2.123456", "a.1234567", ".",
                         "Nov", "9", "12:01:01", "dn228/dn228"] * 3 + ["", "é", "٣"])
SEP = st.sampled_from([" "] * 30 + ["  ", "\t", " \t"])  # mostly plain: one odd separator in ten lines
PLAIN_TOKENS = ["generating", "core.2275", "/tmp/x", "deadbeef", "DEADBEEFcafe", "deadbee", "abcdefgh1", "blk_-42",
                "blk_7", "blk_x", "x", "<*>", "1.5e3", ":", "0x1f", "a/b", "-"]
ODD_TOKENS = ["", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x7f", "é", "٣"]
CONTENT = st.lists(st.sampled_from(PLAIN_TOKENS * 4 + ODD_TOKENS), max_size=12).map(" ".join)
CLOCK = st.sampled_from(["2005-06-03-15.42.50.675872", "15.42.50.67587", "123456", "1.2.123456", "a.1234567", ".",
                         "12345", "x.123456", "123456.", "12:01:01"])
BGL_LIKE = st.builds(
    lambda label, stamp, date, node, clock, fields, seps, content, end: (
        "".join(part + sep for part, sep in zip([label, stamp, date, node, clock, *fields], seps)) + content
        + end).encode(),
    st.sampled_from(["-"] * 6 + ["APPREAD", "KERNDTLB", "", " -"]), DIGITS,
    st.sampled_from(["2005.06.03"] * 4 + ["2005.6.03", "2005-06-03", "2005.06.0٣", "20050603xx"]), FIELD, CLOCK,
    st.lists(FIELD, min_size=3, max_size=5), st.lists(SEP, min_size=10, max_size=10), CONTENT,
    st.sampled_from(["", "", "", "\n", "\r\n", " "]))
HDFS_LIKE = st.builds(
    lambda date, clock, pid, level, component, colon, content, end: (
        f"{date} {clock} {pid} {level} {component}{colon}{content}{end}").encode(),
    st.sampled_from(["081109", "081399", "080013", "080230", "080100", "991231", "0811", "08110٩"]),
    st.sampled_from(["203615", "246199", "000000", "2036", "20361a"]), st.sampled_from(["148", "0", "", "x1"]),
    st.sampled_from(["INFO", "WARN", "", "a b"]),
    st.sampled_from(["dfs.DataNode$PacketResponder", "a:b", "x", "", "dfs.FSNamesystem:"]),
    st.sampled_from([": ", ":", ":  ", ":\t", " : ", ": \n"]), CONTENT, st.sampled_from(["", "\n", "\r\n", " "]))


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["bgl", "thunderbird", "liberty", "hdfs"]), st.sampled_from([64, 1_048_576]))
def test_batch_path_on_near_misses(data: st.DataObject, fmt: str, max_bytes: int) -> None:
    """Records built to sit on either side of the plain shapes (spacing, digits, dates, micros, months,
    hex runs, repeated block ids, inner and trailing line breaks): the batch path gives what
    `parse` gives."""
    values: list[bytes | None] = data.draw(st.lists(HDFS_LIKE if fmt == "hdfs" else BGL_LIKE, min_size=1,
                                                    max_size=40))
    times = record_times_for(len(values))
    expected = one_by_one(LineParser(fmt, max_bytes), values, times)
    assert batched(LineParser(fmt, max_bytes, vector_min=1), values, times, [len(values)]) == expected


SPACED = st.lists(st.sampled_from(PLAIN_TOKENS + ["", "", "deadbeefa", "DeadBeef", "abcdefab/", "fffffff", "7"]),
                  max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(SPACED, min_size=1, max_size=30))
def test_batch_masking_is_mask(contents: list[str]) -> None:
    """The batch path's template of a plain content (its only whitespace is the space) is `masking.mask`'s,
    token by token: runs of spaces, leading and trailing ones, empty contents, hex runs of 7-9 letters
    (HDFS content starts right after one space, so leading spaces are part of it)."""
    values: list[bytes | None] = [f"081109 203615 148 INFO dfs.X: {content}".encode() for content in contents]
    plain = BatchParser("hdfs", 1_048_576).parse(values)
    assert plain.rows == list(range(len(contents)))
    assert plain.templates == [mask(content) for content in contents]


@pytest.mark.parametrize("fmt", ["bgl", "thunderbird", "hdfs"])
def test_tabs_and_inner_breaks_take_the_reference_path(fmt: str) -> None:
    """A plain record is printable ASCII: a tab or an inner line break sends the record to the per-line
    parser (which splits BGL headers at tabs too, and masks tab-separated tokens), its neighbours stay
    on the batch path."""
    header = "081109 203615 148 INFO dfs.X: " if fmt == "hdfs" else "- 1117838570 2005.06.03 R02 x y z w v "
    if fmt == "thunderbird":
        header = "- 1131566461 2005.11.09 tbird-admin1 Nov 10 00:01:01 local@tbird-admin1 "
    contents = ["a 12 b", "a\t12 b", "deadbeefcafe\t/x", "a\n12", "a b"]
    values: list[bytes | None] = [(header + content).encode() for content in contents]
    if fmt != "hdfs":
        values.append(header.replace(" ", "\t", 2).encode() + b"tabbed header 7")
    plain = BatchParser(fmt, 1_048_576).parse(values)
    assert plain.rows == [0, 4]
    times = record_times_for(len(values))
    expected = one_by_one(LineParser(fmt), values, times)
    assert batched(LineParser(fmt, vector_min=1), values, times, [len(values)]) == expected


def test_hardening_inputs_through_the_batch_path() -> None:
    values: list[bytes | None] = [line.encode() for line in CLOCK_AHEAD_HDFS]
    times = record_times_for(len(values))
    expected = one_by_one(LineParser("hdfs"), values, times)
    assert batched(LineParser("hdfs", vector_min=1), values, times, [len(values)]) == expected


@pytest.mark.parametrize("name,fmt", [("BGL/BGL_train_sample.log", "bgl"), ("HDFS/HDFS_train_sample.log", "hdfs"),
                                      ("Thunderbird/Thunderbird_2k.log", "thunderbird")])
def test_most_real_lines_take_the_batch_path(name: str, fmt: str) -> None:
    """The shared samples are nearly all plain records: the batch path parses them, not the per-line fallback."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    values: list[bytes | None] = list(path.read_bytes().splitlines()[:20_000])
    plain = BatchParser(fmt, 1_048_576).parse(values)
    assert len(plain.rows) >= 0.99 * len(values)


SAMPLE_LINES = {fmt: (SAMPLES / name).read_bytes().splitlines()[:400]
                for fmt, name in [("hdfs", "HDFS_2k.log"), ("bgl", "BGL_2k.log")]}
EDIT = st.sampled_from([b"", b" ", b"  ", b"\t", b"\n", b"\r", b"\xc3\xa9", b"\xd9\xa3", b"0", b"9", b":", b": ",
                        b".", b"/", b"-", b"blk_1", b" blk_-2", b"deadbeefcafe", b"x", b"\x00", b"\xff"])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["hdfs", "bgl"]), st.lists(st.tuples(st.integers(0, 399), st.integers(0, 200),
                                                            st.integers(0, 3), EDIT), min_size=1, max_size=40))
def test_batch_path_on_edited_real_lines(fmt: str, edits: list[tuple[int, int, int, bytes]]) -> None:
    """Real lines with one edit each (a few bytes replaced by a space, a digit, a colon, a non-ASCII or
    control character, a block id, a hex run...): most stay plain, some just stop being so."""
    lines = SAMPLE_LINES[fmt]
    values: list[bytes | None] = []
    for index, at, cut, insert in edits:
        line = lines[index % len(lines)]
        at = min(at, len(line))
        values.append(line[:at] + insert + line[at + cut:])
    times = record_times_for(len(values))
    expected = one_by_one(LineParser(fmt), values, times)
    assert batched(LineParser(fmt, vector_min=1), values, times, [len(values)]) == expected


@pytest.mark.parametrize("fmt", ["hdfs", "bgl"])
def test_block_ids_from_tokens(fmt: str) -> None:
    """Block ids come from the content's distinct tokens: a token naming two blocks, two tokens naming the
    same block, `blk_` without digits, and a block named in a header field (taken from the whole line)."""
    header = "081109 203615 148 INFO dfs.X: " if fmt == "hdfs" else "- 1117838570 2005.06.03 R02 x y z w v "
    contents = ["Receiving blk_1 src", "copy blk_1/blk_-2 and blk_3", "blk_5 again blk_5 then blk_4 blk_5",
                "blk_x blk_- blk_", "no block", "blk_-7."]
    values: list[bytes | None] = [(header + content).encode() for content in contents]
    if fmt == "hdfs":
        values.append(b"081109 203615 148 blk_9 dfs.X: Receiving blk_1")
        values.append(b"081109 203615 148 INFO blk_8: blk_1 blk_8")
    else:
        values.append(b"- 1117838570 2005.06.03 blk_9 x y z w v Receiving blk_1")
    plain = BatchParser(fmt, 1_048_576).parse(values)
    assert plain.rows == list(range(len(values)))
    assert plain.blocks == [block_ids(value.decode()) for value in values if value is not None]
    assert plain.blocks[1] == ("blk_1", "blk_-2", "blk_3") and plain.blocks[2] == ("blk_5", "blk_4")
