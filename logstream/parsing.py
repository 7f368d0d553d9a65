"""Line formats (HDFS, BGL, Thunderbird, Liberty, generic) and variable masking.

Shared by the consumer and the trainer: a record's bytes become a `LogLine` (content masked into a
template, event time, label, block ids) here and nowhere else. Records that cannot be parsed raise
`BadRecord` with a short machine-readable reason; the caller routes them to the dead-letter topic.
Masking and block ids: `logstream.masking`.

A consume batch of a fixed-header format goes through `logstream.batchparse` first (one compiled
pass over the batch's bytes); what it leaves (and every generic line) is parsed here line by line,
the reference the batch path is tested against.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from typing import TYPE_CHECKING, Any

from logstream.logs import get_logger
from logstream.masking import BLOCK_ID, MASK, block_ids, mask
from logstream.records import LogLine, TimeSource
from logstream.timestamps import leading_timestamp

if TYPE_CHECKING:
    from logstream.batchparse import BatchParser

log = get_logger(__name__)

__all__ = ["MASK", "BadRecord", "LineParser", "ParsedLine", "block_ids", "decode_record", "line_breaks", "mask",
           "parse_bgl", "parse_generic", "parse_hdfs", "parse_thunderbird", "parser_for"]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HDFS = re.compile(r"(\d{6}) (\d{6}) (\d+) (\S+) (\S+?):(?: (.*))?$", re.DOTALL)
BOM = "\ufeff"  # a UTF-8 byte-order mark (EF BB BF) decoded: never data at the start of a line


class BadRecord(ValueError):
    """A record that cannot become a log line; `reason` is a short label for metrics and the DLQ."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _parser_fault(exc: Exception) -> BadRecord:
    """A format's parser raised something other than `BadRecord` on a record: a fault of ours, never a
    reason to lose the consume batch or stop the consumer. The record goes to the dead-letter topic
    (reason `parser_error`, the exception in the detail) and the fault is logged at error level."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    log.error("parser_fault", error=detail, action="record dead-lettered as parser_error; please report it")
    return BadRecord("parser_error", detail)


@dataclass(slots=True, frozen=True)
class ParsedLine:
    """What a format extracts from one line, before masking."""

    content: str
    event_time: float | None
    label: bool | None


Fields = tuple[str, "float | None", "bool | None"]  # a ParsedLine's fields, in order


# --- formats -----------------------------------------------------------------------------------

_day_cache: dict[str, int] = {}


def _hdfs_time(date: str, time: str) -> float:
    day = _day_cache.get(date)
    if day is None:
        day = calendar.timegm((2000 + int(date[0:2]), int(date[2:4]), int(date[4:6]), 0, 0, 0))
        if len(_day_cache) > 4096:
            _day_cache.clear()
        _day_cache[date] = day
    return float(day + int(time[0:2]) * 3600 + int(time[2:4]) * 60 + int(time[4:6]))


def _hdfs_fields(line: str) -> Fields:
    match = _HDFS.match(line)
    if match is None:
        raise BadRecord("unparseable", "not an HDFS line")
    date, time, _pid, _level, _component, content = match.groups()
    try:
        event_time = _hdfs_time(date, time)
    except ValueError as exc:
        raise BadRecord("unparseable", f"bad HDFS timestamp: {exc}") from None
    return content or "", event_time, None


def parse_hdfs(line: str) -> ParsedLine:
    """`<Date yymmdd> <Time hhmmss> <Pid> <Level> <Component>: <Content>`; labels live in a block file."""
    return ParsedLine(*_hdfs_fields(line))


def _alert_label(tag: str) -> bool:
    return tag != "-"


def _header_time(fields: list[str]) -> float:
    """Unix time of a BGL/Thunderbird/Liberty header, checked against its date field (yyyy.mm.dd)."""
    stamp, date = fields[1], fields[2]
    # the date check is `\d{4}\.\d{2}\.\d{2}` (Unicode decimal digits, as `re`'s \d) without a regex call
    if not (stamp.isascii() and stamp.isdigit()) or not (
        len(date) == 10 and date[4] == "." and date[7] == "." and date[:4].isdecimal()
        and date[5:7].isdecimal() and date[8:].isdecimal()
    ):
        raise BadRecord("unparseable", f"header {stamp[:24]!r} {date[:24]!r} is not '<unix time> <yyyy.mm.dd>'")
    return float(stamp)


def _bgl_fields(line: str) -> Fields:
    fields = line.split(None, 9)
    if len(fields) < 9:
        raise BadRecord("unparseable", f"BGL line has {len(fields)} of 9 header fields")
    event_time = _header_time(fields)
    micros = fields[4].rpartition(".")[2]
    if len(micros) == 6 and micros.isdecimal():  # not isdigit: int() refuses superscripts such as "²"
        event_time += int(micros) / 1e6
    return fields[9] if len(fields) == 10 else "", event_time, _alert_label(fields[0])


def parse_bgl(line: str) -> ParsedLine:
    """`<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> <Content>`.

    The content may be empty (real BGL lines with only a header). The event time is the unix
    timestamp with the microseconds of the Time field.
    """
    return ParsedLine(*_bgl_fields(line))


def _thunderbird_fields(line: str) -> Fields:
    fields = line.split(None, 8)
    if len(fields) < 8:
        raise BadRecord("unparseable", f"line has {len(fields)} of 8 header fields")
    return fields[8] if len(fields) == 9 else "", _header_time(fields), _alert_label(fields[0])


def parse_thunderbird(line: str) -> ParsedLine:
    """`<Label> <Timestamp> <Date> <Admin> <Month> <Day> <Time> <AdminAddr> <Content>` (Liberty too)."""
    return ParsedLine(*_thunderbird_fields(line))


def _generic_fields(line: str, reference: float) -> Fields:
    found = leading_timestamp(line, reference)
    if found is None:
        return line, None, None
    return found[0], found[1], None


def parse_generic(line: str, reference: float | None = None) -> ParsedLine:
    """The whole line is the content, after an optional leading timestamp (`logstream.timestamps`).

    `reference` (epoch seconds, default now) dates year-less syslog stamps.
    """
    return ParsedLine(*_generic_fields(line, time.time() if reference is None else reference))


FORMATS: dict[str, Callable[[str], ParsedLine]] = {
    "hdfs": parse_hdfs,
    "bgl": parse_bgl,
    "thunderbird": parse_thunderbird,
    "liberty": parse_thunderbird,
    "generic": parse_generic,
}


# The formats with a fixed header as plain tuples, for the per-record path (no ParsedLine object
# per line). The generic format also needs a reference time (year-less stamps): `LineParser` calls
# `_generic_fields` itself.
_FIELDS: dict[str, Callable[[str], Fields]] = {
    "hdfs": _hdfs_fields,
    "bgl": _bgl_fields,
    "thunderbird": _thunderbird_fields,
    "liberty": _thunderbird_fields,
}


def parser_for(fmt: str) -> Callable[[str], ParsedLine]:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


# --- records -> lines --------------------------------------------------------------------------


def line_breaks(text: str) -> str:
    """`text` without line terminators at its end, and with `\n` for each `\r\n` or lone `\r` inside."""
    text = text.rstrip("\r\n")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def decode_record(value: bytes | None, max_bytes: int) -> str:
    """Bytes of one record to the text of one line, or `BadRecord`.

    Text logstream did not write is taken as it comes from files and shippers:
    - a leading UTF-8 byte-order mark (Windows editors, spreadsheet exports) is not data: dropped;
    - line terminators at the end (`\n`, `\r\n`, a stray `\r` left by splitting a CRLF file on
      `\n`, or any run of them) are removed, so a line gives the same text whatever its ending;
    - line breaks inside a multi-line record (a stack trace) are kept as one message, each `\r\n`
      or lone `\r` written as `\n`.
    """
    if not value:
        raise BadRecord("empty")
    if len(value) > max_bytes:
        raise BadRecord("too_large", f"{len(value)} bytes > {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord("undecodable", f"invalid UTF-8 at byte {exc.start}") from None
    if text.startswith(BOM):
        text = text[1:]
    text = line_breaks(text)
    if not text or text.isspace():  # what `not text.strip()` says, without building a copy
        raise BadRecord("empty")
    if not text.isprintable():  # every control character is unprintable: most lines skip the search
        bad = _CONTROL.search(text)
        if bad is not None:
            raise BadRecord("control_characters", f"byte 0x{ord(bad.group()):02x} at {bad.start()}")
    return text


def _new_lines(count: int, columns: Sequence[Iterable[Any]]) -> list[LogLine]:
    """`count` LogLines from nine columns (iterables in field order): zipped and made into lines at C
    speed, no Python call per line."""
    return list(islice(map(_tuple_new, repeat(LogLine), zip(*columns)), count))


_tuple_new = tuple.__new__


def _batch_parser(fmt: str, max_line_bytes: int) -> BatchParser | None:
    """The batch path of a fixed-header format (None for the generic one). Imported here, not at the top:
    numba and its compiled loop load only where a fixed-header format is parsed."""
    if fmt not in _FIELDS:
        return None
    from logstream.batchparse import BatchParser  # noqa: PLC0415 - see the docstring

    return BatchParser(fmt, max_line_bytes)

TEMPLATE_CACHE_ENTRIES = 16_384
VECTOR_MIN_RECORDS = 32  # batches of fewer records are parsed line by line (`LineParser.parse_batch`)
TEMPLATE_CACHE_MAX_CHARS = 512


class LineParser:
    """Turns records of one format into `LogLine`s; the one entry point for consumer and trainer.

    Keeps a bounded content -> template map: masking is the costliest step per line and many real
    contents repeat verbatim (BGL: 60% of lines). Only short contents are kept and the map is
    emptied when full, so its memory stays bounded (about 16k x 1 KB at worst).

    Event time: HDFS, BGL, Thunderbird and Liberty lines always carry their own (a line without one
    is unparseable). A generic line without a recognised stamp (a stack-trace continuation) takes
    the last event time seen on its partition (file: earlier in the file), marked
    `time_source="inherited"`; only before any stamped line does it take the record's Kafka
    timestamp (`"record"`). That state is per (topic, partition) and starts afresh with `forget`
    (the consumer calls it when it takes a partition on), so a replay gives the same times.
    """

    def __init__(self, fmt: str, max_line_bytes: int = 1_048_576, vector_min: int = VECTOR_MIN_RECORDS) -> None:
        self.format = fmt
        self.max_line_bytes = max_line_bytes
        self.vector_min = vector_min  # smaller batches: per line (a batch-path call has a fixed cost)
        parser_for(fmt)  # refuses an unknown format with the list of known ones
        self._fields = _FIELDS.get(fmt)
        self._vector = _batch_parser(fmt, max_line_bytes)
        self._templates: dict[str, str] = {}
        self._last_times: dict[tuple[str, int], float] = {}
        self._reference = time.time()  # dates year-less stamps of records without a time (files)

    @property
    def reads_record_times(self) -> bool:
        """Whether a record's Kafka timestamp can become a line's event time (the generic format: a line
        without a stamp of its own); the fixed-header formats never read it."""
        return self._fields is None

    def parse(
        self,
        value: bytes | None,
        *,
        topic: str,
        partition: int,
        offset: int,
        record_time: float,
    ) -> LogLine:
        """Parse one record; `record_time` (Kafka timestamp, seconds; 0 for none, as in files) is the
        event time of a line without one when its partition has shown no time yet (see the class)."""
        return self._line(decode_record(value, self.max_line_bytes), topic, partition, offset, record_time)

    def parse_text(self, text: str, *, topic: str, partition: int, offset: int, record_time: float) -> LogLine:
        """`parse` for text already decoded by `decode_record`."""
        return self._line(text, topic, partition, offset, record_time)

    def parse_batch(
        self,
        values: Sequence[bytes | None],
        *,
        topic: str,
        partition: int,
        offsets: Sequence[int],
        record_times: Sequence[float],
    ) -> list[LogLine | BadRecord]:
        """Parse consecutive records of one partition (a consume batch) at once.

        The same result, record for record, as `parse` on each in order (a `BadRecord` in the
        record's place instead of raised, state such as a generic line's inherited time carried
        across the batch). A batch of a fixed-header format of at least `vector_min` records goes
        through `batchparse.BatchParser` (one compiled pass over the batch); the records it
        leaves, and every other batch, take the per-line steps of `parse` in one loop. `values`,
        `offsets` and `record_times` (seconds, 0 for none) are parallel sequences. Raises ValueError
        when their lengths differ.
        """
        if not len(values) == len(offsets) == len(record_times):
            raise ValueError(f"parse_batch: {len(values)} values, {len(offsets)} offsets, "
                             f"{len(record_times)} record times")
        if self._vector is None or len(values) < self.vector_min:
            return self._parse_each(values, topic, partition, offsets, record_times)
        plain = self._vector.parse(values)
        plain_offsets = offsets if len(plain.rows) == len(values) else [offsets[row] for row in plain.rows]
        lines: list[LogLine | BadRecord] = list(_new_lines(len(plain.rows), (
            repeat(topic), repeat(partition), plain_offsets, plain.raw, plain.templates, plain.event_times,
            plain.labels, plain.blocks, repeat("line"))))
        if len(lines) == len(values):
            return lines
        out: list[LogLine | BadRecord] = []
        done = 0  # records before this index are in `out`
        for row, line in zip(plain.rows, lines):
            if row > done:
                out += self._parse_each(values[done:row], topic, partition, offsets[done:row], record_times[done:row])
            out.append(line)
            done = row + 1
        if done < len(values):
            out += self._parse_each(values[done:], topic, partition, offsets[done:], record_times[done:])
        return out

    def _parse_each(self, values: Sequence[bytes | None], topic: str, partition: int, offsets: Sequence[int],
                    record_times: Sequence[float]) -> list[LogLine | BadRecord]:
        """`parse` on each record in order, its steps inlined in one loop (the reference path)."""
        out: list[LogLine | BadRecord] = []
        append = out.append
        fields, templates, max_bytes = self._fields, self._templates, self.max_line_bytes
        find_blocks, key = BLOCK_ID.findall, (topic, partition)
        for value, offset, record_time in zip(values, offsets, record_times):
            source: TimeSource = "line"
            try:
                text = decode_record(value, max_bytes)
                if fields is not None:
                    content, event_time, label = fields(text)
                else:
                    content, event_time, label, source = self._generic(text, key, record_time)
            except BadRecord as exc:
                append(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a parser fault costs the record, not the batch
                append(_parser_fault(exc))
                continue
            template = templates.get(content)
            if template is None:
                template = self._template(content)
            if "blk_" in text:
                found = find_blocks(text)
                blocks = tuple(found) if len(found) < 2 else tuple(dict.fromkeys(found))
            else:
                blocks = ()
            append(LogLine(topic, partition, offset, text, template, event_time, label, blocks, source))
        return out

    def forget(self, topic: str, partition: int) -> None:
        """Drop the partition's last event time: its next lines are read as by a fresh parser."""
        self._last_times.pop((topic, partition), None)

    def _line(self, text: str, topic: str, partition: int, offset: int, record_time: float) -> LogLine:
        source: TimeSource = "line"
        try:
            if self._fields is not None:
                content, event_time, label = self._fields(text)
            else:
                content, event_time, label, source = self._generic(text, (topic, partition), record_time)
        except BadRecord:
            raise
        except Exception as exc:  # noqa: BLE001 - a parser fault costs the record, not the caller's loop
            raise _parser_fault(exc) from exc
        template = self._templates.get(content)
        if template is None:
            template = self._template(content)
        return LogLine(topic, partition, offset, text, template, event_time, label,  # type: ignore[arg-type]
                         block_ids(text), source)

    def _generic(self, text: str, key: tuple[str, int], record_time: float) -> tuple[str, float, None, TimeSource]:
        """A generic line's content and event time (own, inherited or the record's; see the class)."""
        content, stamp, label = _generic_fields(text, record_time if record_time > 0 else self._reference)
        if stamp is not None:
            self._last_times[key] = stamp
            return content, stamp, label, "line"
        last = self._last_times.get(key)
        return (content, record_time, label, "record") if last is None else (content, last, label, "inherited")

    def _template(self, content: str) -> str:
        """Mask `content`, remembering short contents (bounded map, emptied when full)."""
        template = mask(content)
        if len(content) <= TEMPLATE_CACHE_MAX_CHARS:
            if len(self._templates) >= TEMPLATE_CACHE_ENTRIES:
                self._templates.clear()
            self._templates[content] = template
        return template
