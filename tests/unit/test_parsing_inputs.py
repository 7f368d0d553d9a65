"""Text logstream did not write, as production brings it: byte-order marks, every line ending,
the timestamp prefixes of the generic format, and lines without a time of their own.

Each case goes through the consumer's record parser and through the trainer's file readers, which
must agree (one code path).
"""

from __future__ import annotations

import calendar
import gzip
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstream.alerts import build_alert
from logstream.detectors.novelty import NoveltyDetector
from logstream.files import iter_log_lines, iter_records, read_block_labels
from logstream.parsing import BadRecord, LineParser, parse_generic
from logstream.records import LogLine, Verdict, Window
from logstream.timestamps import SYSLOG_FUTURE_SLACK_S, leading_timestamp
from trainer.data import count_records, is_logllm_csv, load_split

BOM = b"\xef\xbb\xbf"
SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"
BGL_NORMAL = (b"- 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 "
              b"RAS KERNEL INFO instruction cache parity error corrected")
HDFS_LINE = (b"081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block "
             b"blk_38865049064139660 terminating")
GENERIC_LINE = b"web-frontend cache warm complete"
LINES = {"bgl": BGL_NORMAL, "hdfs": HDFS_LINE, "generic": GENERIC_LINE,
         "thunderbird": b"- 1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 crond[2915]: session closed"}
ENDINGS = [b"", b"\n", b"\r\n", b"\r", b"\r\r\n", b"\n\n"]


def parse(fmt: str, value: bytes, *, partition: int = 0, offset: int = 0, record_time: float = 1.7e9,
          parser: LineParser | None = None) -> LogLine:
    return (parser or LineParser(fmt)).parse(value, topic="t", partition=partition, offset=offset,
                                             record_time=record_time)


def essence(line: LogLine) -> tuple[object, ...]:
    """What training and serving must agree on for the same line."""
    return line.raw, line.template, line.event_time, line.label, line.block_ids, line.time_source


# --- byte-order marks --------------------------------------------------------------------------


def test_bom_before_a_bgl_line_is_not_its_alert_tag() -> None:
    line = parse("bgl", BOM + BGL_NORMAL)
    assert line.label is False  # '-', not '\ufeff-'
    assert essence(line) == essence(parse("bgl", BGL_NORMAL))


@pytest.mark.parametrize("fmt", sorted(LINES))
def test_bom_at_the_start_of_a_kafka_record_is_not_data(fmt: str) -> None:
    plain = parse(fmt, LINES[fmt])
    for value in (BOM + LINES[fmt], BOM + LINES[fmt] + b"\r\n"):
        assert essence(parse(fmt, value)) == essence(plain)
    assert parse("hdfs", BOM + HDFS_LINE).block_ids == ("blk_38865049064139660",)


def test_a_bom_inside_a_line_stays_data() -> None:
    assert parse("generic", b"a " + BOM + b"b").raw == "a \ufeffb"


@pytest.mark.parametrize("gz", [False, True])
def test_bom_opening_a_log_file(tmp_path: Path, gz: bool) -> None:
    body = BOM + BGL_NORMAL + b"\n" + BGL_NORMAL + b"\n"
    path = tmp_path / ("bgl.log.gz" if gz else "bgl.log")
    path.write_bytes(gzip.compress(body) if gz else body)
    assert list(iter_records(path)) == [BGL_NORMAL + b"\n"] * 2  # what `logstream produce` sends
    bad: Counter[str] = Counter()
    lines = list(iter_log_lines(path, LineParser("bgl"), bad=bad))
    assert not bad and [line.label for line in lines] == [False, False]
    assert lines[0].raw == lines[1].raw


def test_bom_before_an_hdfs_dump_keeps_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "hdfs.log"
    path.write_bytes(BOM + HDFS_LINE + b"\r\n")
    bad: Counter[str] = Counter()
    lines = iter_log_lines(path, LineParser("hdfs"), bad=bad)
    assert [line.block_ids for line in lines] == [("blk_38865049064139660",)]
    assert not bad


def test_bom_before_a_bgl_dump_leaves_a_clean_window_clean(tmp_path: Path) -> None:
    path = tmp_path / "bgl.log"
    path.write_bytes(BOM + b"\r\n".join([BGL_NORMAL] * 20) + b"\r\n")
    split = load_split("bgl", path, window_size=5)
    assert [item.label for item in split.train + split.test] == [False] * 5  # 16 train lines, 4 test


def test_bom_opening_a_block_label_file(tmp_path: Path) -> None:
    path = tmp_path / "anomaly_label.csv"
    path.write_bytes(BOM + b"BlockId,Label\r\nblk_1,Normal\r\nblk_2,Anomaly\r\n")
    assert read_block_labels(path) == {"blk_1": False, "blk_2": True}


def test_bom_opening_a_logllm_csv(tmp_path: Path) -> None:
    path = tmp_path / "liberty.csv"
    rows = [b"line_no,window,label,content"] + [f"{i},1,0,ntpd[{i}]: kernel time".encode() for i in range(1, 11)]
    path.write_bytes(BOM + b"\r\n".join(rows) + b"\r\n")
    assert is_logllm_csv(path)
    split = load_split("liberty", path, window_size=5)
    assert split.stats["source_format"] == "logllm-csv" and not split.stats["skipped_lines"]
    assert {line.template for item in split.train + split.test for line in item.window.lines} == {"<*> kernel time"}


# --- line endings ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(LINES))
@pytest.mark.parametrize("ending", ENDINGS, ids=repr)
def test_every_line_ending_gives_the_same_line_from_a_record(fmt: str, ending: bytes) -> None:
    assert essence(parse(fmt, LINES[fmt] + ending)) == essence(parse(fmt, LINES[fmt]))


@pytest.mark.parametrize("fmt", sorted(LINES))
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r\r\n"], ids=repr)
def test_the_file_reader_and_the_record_parser_agree_on_every_ending(tmp_path: Path, fmt: str, ending: bytes) -> None:
    path = tmp_path / "dump.log"
    path.write_bytes((LINES[fmt] + ending) * 3 + LINES[fmt])  # the last line without a terminator
    from_file = list(iter_log_lines(path, LineParser(fmt), topic="t"))
    assert count_records(path) == len(from_file) == 4
    # a shipper splitting the same file on \n sends the pieces as they are, a stray \r included
    records = path.read_bytes().split(b"\n")
    parser = LineParser(fmt)
    streamed = [parse(fmt, record, offset=i, record_time=0.0, parser=parser)
                for i, record in enumerate(records) if record.strip()]
    assert [essence(line) for line in from_file] == [essence(line) for line in streamed]


def test_line_breaks_inside_a_multiline_record_are_one_kind() -> None:
    trace = parse("generic", b"Traceback:\r\n  at x.y(Z.java:1)\r\n")
    assert trace.raw == "Traceback:\n  at x.y(Z.java:1)"
    assert essence(parse("generic", b"Traceback:\n  at x.y(Z.java:1)\n")) == essence(trace)
    assert parse("generic", b"a\rb").raw == "a\nb"


def test_novelty_fitted_on_a_crlf_file_stays_quiet_on_its_records_split_on_newline(tmp_path: Path) -> None:
    lines = [b"2024-01-02T03:04:05Z web-frontend cache warm complete", b"web-frontend cache warm complete",
             b"Nov  3 04:12:01 host sshd[42]: session opened for user deploy", b"    at a.b.C.run(C.java:17)"]
    path = tmp_path / "app.log"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    detector = NoveltyDetector.fit(iter_log_lines(path, LineParser("generic")), source=str(path))
    parser = LineParser("generic")
    streamed = [parse("generic", record, offset=i, parser=parser)
                for i, record in enumerate(path.read_bytes().split(b"\n")) if record]
    assert all(line.raw.endswith(("complete", "deploy", ")")) for line in streamed)
    verdict = detector.score([Window("count", "t/0", "t", 0, streamed, "size")])[0]
    assert not verdict.anomalous and verdict.score == 0


# --- generic timestamps ------------------------------------------------------------------------


def utc(*fields: int) -> float:
    return float(calendar.timegm((*fields, 0, 0, 0)[:6]))


NOW = utc(2026, 11, 30, 12, 0, 0)  # the reference (a record's Kafka timestamp) for year-less stamps

STYLES = [  # (line, event time, content); the second line of a pair is the same event on another day
    ("2024-01-02T03:04:05.5+01:00 worker 7 restarted", utc(2024, 1, 2, 2, 4, 5) + 0.5, "worker 7 restarted"),
    ("2024-01-02 03:04:05 worker 7 restarted", utc(2024, 1, 2, 3, 4, 5), "worker 7 restarted"),
    ("2024-01-02 03:04:05,678 INFO [main] c.e.App - started", utc(2024, 1, 2, 3, 4, 5) + 0.678,
     "INFO [main] c.e.App - started"),
    ("[2024-01-02 03:04:05,678] INFO Kafka server started", utc(2024, 1, 2, 3, 4, 5) + 0.678,
     "INFO Kafka server started"),
    ("<34>1 2003-10-11T22:14:15.003Z mymachine su - ID47 - 'su root' failed", utc(2003, 10, 11, 22, 14, 15) + 0.003,
     "mymachine su - ID47 - 'su root' failed"),
    ("Nov  3 04:12:01 host sshd[42]: session opened", utc(2026, 11, 3, 4, 12, 1), "host sshd[42]: session opened"),
    ("Nov 13 04:12:01 host sshd[42]: session opened", utc(2026, 11, 13, 4, 12, 1), "host sshd[42]: session opened"),
    ("<13>Nov  3 04:12:01 host sshd[42]: session opened", utc(2026, 11, 3, 4, 12, 1), "host sshd[42]: session opened"),
    ("Dec  5 23:59:59 host kernel: eth0 link up", utc(2026, 12, 5, 23, 59, 59), "host kernel: eth0 link up"),
    ("Dec 31 23:59:59 host kernel: eth0 link up", utc(2025, 12, 31, 23, 59, 59), "host kernel: eth0 link up"),
    ("2024/01/02 03:04:05 [error] 12#0: upstream timed out", utc(2024, 1, 2, 3, 4, 5),
     "[error] 12#0: upstream timed out"),
    ("[Wed Oct 11 14:32:52.123456 2000] [core:error] [pid 35708] File does not exist",
     utc(2000, 10, 11, 14, 32, 52) + 0.123456, "[core:error] [pid 35708] File does not exist"),
    ("[10/Oct/2000:13:55:36 -0700] GET /index.html 200", utc(2000, 10, 10, 20, 55, 36), "GET /index.html 200"),
    ('127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326',
     utc(2000, 10, 10, 20, 55, 36), '127.0.0.1 - frank "GET /apache_pb.gif HTTP/1.0" 200 2326'),
    ("1700000000 job finished", 1700000000.0, "job finished"),
    ("1700000000.25 job finished", 1700000000.25, "job finished"),
    ("1700000000123 job finished", 1700000000.123, "job finished"),
]


@pytest.mark.parametrize(("line", "event_time", "content"), STYLES, ids=[s[0][:28] for s in STYLES])
def test_generic_timestamp_styles(line: str, event_time: float, content: str) -> None:
    parsed = parse_generic(line, reference=NOW)
    assert parsed.content == content
    assert parsed.event_time == pytest.approx(event_time, abs=1e-6)
    record = parse("generic", line.encode(), record_time=NOW)
    assert (record.event_time, record.time_source) == (pytest.approx(event_time, abs=1e-6), "line")


DAYS = [  # the same event on two days: one template
    ("2024-01-02T03:04:05Z worker restarted", "2024-03-17T21:09:55.25Z worker restarted"),
    ("2024-01-02 03:04:05,678 INFO started", "2024-02-11 13:14:15,001 INFO started"),
    ("<34>1 2003-10-11T22:14:15.003Z mymachine su - - - failed",
     "<34>1 2003-10-12T01:00:00Z mymachine su - - - failed"),
    ("Nov  3 04:12:01 host sshd: session opened", "Oct 22 17:00:59 host sshd: session opened"),
    ("2024/01/02 03:04:05 [error] upstream timed out", "2024/05/06 07:08:09 [error] upstream timed out"),
    ("[Wed Oct 11 14:32:52 2000] [core:error] missing", "[Thu Oct 12 01:02:03 2000] [core:error] missing"),
    ('h - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.0"', 'h - - [11/Nov/2001:01:02:03 +0000] "GET / HTTP/1.0"'),
    ("1700000000 job finished", "1700086400 job finished"),
    ("1700000000123 job finished", "1700086400999 job finished"),
]


@pytest.mark.parametrize(("first", "second"), DAYS, ids=[d[0][:28] for d in DAYS])
def test_the_same_event_on_another_day_has_the_same_template(first: str, second: str) -> None:
    one, two = parse("generic", first.encode()), parse("generic", second.encode())
    assert one.template == two.template
    assert one.event_time != two.event_time and one.time_source == two.time_source == "line"


@pytest.mark.parametrize("line", [
    "1234 requests served", "17000000000 eleven digits", "4294967295 bytes free", "9999999999999 ms",
    "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660 Arabic-Indic digits", "Nov 31 04:12:01 no such day",
    "2024-13-02 03:04:05 bad month",
    "2024-01-02T03:04:05Zworker glued", "[10/Foo/2000:13:55:36 -0700] bad month", "Monday morning", "",
])
def test_what_is_not_a_timestamp_stays_content(line: str) -> None:
    assert leading_timestamp(line, NOW) is None
    assert parse_generic(line, reference=NOW).content == line


def test_syslog_year_is_the_latest_not_far_after_the_reference() -> None:
    def year(stamp: str, reference: float) -> int:
        found = leading_timestamp(f"{stamp} host x", reference)
        assert found is not None
        return datetime.fromtimestamp(found[1], timezone.utc).year

    assert year("Dec 31 23:59:59", utc(2027, 1, 2, 0, 0, 0)) == 2026  # read just after new year
    assert year("Jan  1 00:00:01", utc(2026, 12, 30, 0, 0, 0)) == 2027  # a clock a little ahead
    assert year("Mar  3 10:00:00", utc(2027, 1, 2, 0, 0, 0)) == 2026  # an older file read in January
    assert year("Feb 29 12:00:00", utc(2026, 11, 30, 0, 0, 0)) == 2024  # the latest leap year
    ahead = utc(2026, 11, 30, 0, 0, 0) + SYSLOG_FUTURE_SLACK_S
    assert year("Dec  7 00:00:00", ahead - 86_400 * 7) == 2026


def test_a_replayed_record_gets_the_same_syslog_time() -> None:
    value = b"Jan  1 00:00:01 host cron: ran"
    first = parse("generic", value, record_time=utc(2026, 12, 31, 23, 59, 0))
    again = LineParser("generic").parse(value, topic="t", partition=0, offset=0,
                                        record_time=utc(2026, 12, 31, 23, 59, 0))
    assert first.event_time == again.event_time == utc(2027, 1, 1, 0, 0, 1)


# --- lines without a time of their own ----------------------------------------------------------


def test_a_continuation_line_inherits_the_last_event_time_of_its_partition() -> None:
    parser = LineParser("generic")
    stamped = parse("generic", b"2024-01-02T09:02:00Z ERROR request failed", parser=parser, record_time=NOW)
    trace = parse("generic", b"    at a.b.C.run(C.java:17)", parser=parser, offset=1, record_time=NOW + 5)
    other = parse("generic", b"    at a.b.C.run(C.java:17)", parser=parser, partition=1, offset=1, record_time=NOW)
    assert (stamped.event_time, stamped.time_source) == (utc(2024, 1, 2, 9, 2, 0), "line")
    assert (trace.event_time, trace.time_source) == (utc(2024, 1, 2, 9, 2, 0), "inherited")
    assert (other.event_time, other.time_source) == (NOW, "record")  # nothing seen on partition 1 yet
    parser.forget("t", 0)  # the partition was taken on again: as a fresh parser
    again = parse("generic", b"    at a.b.C.run(C.java:17)", parser=parser, offset=2, record_time=NOW + 9)
    assert (again.event_time, again.time_source) == (NOW + 9, "record")


def test_the_file_reader_inherits_times_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"    at orphan(A.java:1)\n2024-01-02T09:02:00Z ERROR failed\n    at a.b(C.java:17)\n"
                     b"2024-01-02T09:03:00Z INFO ok\n")
    lines = list(iter_log_lines(path, LineParser("generic")))
    assert [(line.event_time, line.time_source) for line in lines] == [
        (0.0, "record"), (utc(2024, 1, 2, 9, 2, 0), "line"), (utc(2024, 1, 2, 9, 2, 0), "inherited"),
        (utc(2024, 1, 2, 9, 3, 0), "line")]


def test_fixed_formats_always_carry_their_own_time() -> None:
    parser = LineParser("hdfs")
    for offset in range(3):
        assert parse("hdfs", HDFS_LINE, parser=parser, offset=offset).time_source == "line"


def test_the_alert_says_how_many_lines_had_no_time_of_their_own() -> None:
    parser = LineParser("generic")
    values = [b"    at orphan(A.java:1)", b"2024-01-02T09:02:00Z ERROR failed", b"    at a.b(C.java:17)",
              b"    at c.d(E.java:3)"]
    lines = [parse("generic", value, parser=parser, offset=i, record_time=NOW) for i, value in enumerate(values)]
    window = Window("count", "t/0", "t", 0, lines, "size")
    assert build_alert(window, Verdict(False, 0.0), "null", "1")["event_time"] == {
        "first": "2024-01-02T09:02:00Z", "last": "2026-11-30T12:00:00Z", "inherited_lines": 2, "record_time_lines": 1}
    stamped = Window("count", "t/0", "t", 0, lines[1:2], "size")
    assert set(build_alert(stamped, Verdict(False, 0.0), "null", "1")["event_time"]) == {"first", "last"}


MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
DAYS_OF_WEEK = "Mon Tue Wed Thu Fri Sat Sun".split()
RENDER = {  # style -> (text of the stamp for a UTC time, how precisely it gives the time back)
    "iso": (lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), 1e-6),
    "iso offset": (lambda t: t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00"), 1.0),
    "log4j": (lambda t: t.strftime("%Y-%m-%d %H:%M:%S,") + f"{t.microsecond // 1000:03d}", 1e-3),
    "rfc5424": (lambda t: "<165>1 " + t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), 1e-6),
    "bsd": (lambda t: f"{MONTHS[t.month - 1]} {t.day:2d} " + t.strftime("%H:%M:%S"), 1.0),
    "nginx": (lambda t: t.strftime("%Y/%m/%d %H:%M:%S"), 1.0),
    "apache error": (lambda t: f"[{DAYS_OF_WEEK[t.weekday()]} {MONTHS[t.month - 1]} {t.day:02d} "
                               + t.strftime("%H:%M:%S.%f %Y]"), 1e-6),
    "access": (lambda t: t.strftime("[%d/") + MONTHS[t.month - 1] + t.strftime("/%Y:%H:%M:%S +0000]"), 1.0),
    "epoch": (lambda t: str(int(t.timestamp())), 1.0),
    "epoch ms": (lambda t: str(int(t.timestamp() * 1000)), 1e-3),
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(RENDER)),
       st.datetimes(min_value=datetime(2002, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(timezone.utc)))
def test_every_style_reads_back_the_time_it_was_written_with(style: str, when: datetime) -> None:
    render, precision = RENDER[style]
    found = leading_timestamp(f"{render(when)} worker ready", reference=when.timestamp())
    assert found is not None and found[0] == "worker ready"
    assert when.timestamp() - precision < found[1] <= when.timestamp() + 1e-6


def test_superscript_micros_are_not_micros() -> None:
    """A BGL Time field ending in six characters `str.isdigit` takes but `int` refuses (superscripts) is a
    line without micros, not a crash that would lose its consume batch (found by fuzzing)."""
    value = "- 1117838570 2005.06.03 R02 12345² R02 RAS KERNEL INFO x".encode()
    parser = LineParser("bgl")
    line = parser.parse(value, topic="t", partition=0, offset=0, record_time=0.0)
    assert line.event_time == 1117838570.0
    batch = parser.parse_batch([value, value], topic="t", partition=0, offsets=[0, 1], record_times=[0.0, 0.0])
    assert batch == [line, line._replace(offset=1)]


def test_a_parser_fault_dead_letters_the_record_not_the_batch() -> None:
    """A format's parser raising something other than BadRecord (a fault of ours) costs that record
    (reason parser_error, the exception in the detail), not the batch nor the consumer."""
    parser = LineParser("bgl")
    good = b"- 1117838570 2005.06.03 R02 2005-06-03-15.42.50.675872 R02 RAS KERNEL INFO ok"
    real = parser._fields
    assert real is not None

    def faulty(text: str) -> tuple[str, float | None, bool | None]:
        if "boom" in text:
            raise ZeroDivisionError("division by zero")
        return real(text)

    parser._fields = faulty
    values: list[bytes | None] = [good, good.replace(b"ok", b"boom"), good]
    out = parser.parse_batch(values, topic="t", partition=0, offsets=[0, 1, 2], record_times=[0.0] * 3)
    assert isinstance(out[0], LogLine) and isinstance(out[2], LogLine)
    assert isinstance(out[1], BadRecord) and out[1].reason == "parser_error"
    assert out[1].detail == "ZeroDivisionError: division by zero"
    with pytest.raises(BadRecord, match="parser_error"):
        parser.parse(values[1], topic="t", partition=0, offset=1, record_time=0.0)
