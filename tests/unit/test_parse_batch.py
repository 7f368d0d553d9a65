"""Differential: `LineParser.parse_batch` gives, record for record, what `parse` gives one at a time.

Over every line of every shared sample (each file read in the format it is written in, and as
generic text) and over generated records, good and bad (empty, too large, undecodable, control
characters, byte-order marks, line endings, broken headers, non-ASCII digits), split into consume
batches of uneven sizes: the same fields, templates, block ids, event times and time sources, and
the same dead-letter reason and detail in the place of each bad record.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.parsing import BadRecord, LineParser
from logstream.records import LogLine

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


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="2 values, 1 offsets"):
        LineParser("bgl").parse_batch([b"a", b"b"], topic="t", partition=0, offsets=[0], record_times=[0.0, 0.0])
