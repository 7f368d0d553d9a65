"""A consume batch parsed by Arrow compute kernels, each a C++ loop over the whole batch (RE2 for the few regexes).

`LineParser.parse_batch` hands the records of a fixed-header format (HDFS, BGL, Thunderbird,
Liberty) here first. Kernels find the batch's *plain* records: printable ASCII (no tab, no inner
line break) once the line terminators at the end are trimmed, with the format's exact header shape
(checked field by field on the split header, cheap kernels over short columns; only the BGL date
and the HDFS date take a regular expression, over those few bytes), and no more than the record
size limit. For a plain record every step of the per-line parser (`logstream.parsing`) is a fixed
function of its bytes that a kernel computes for the whole batch at once:

- decoding is the identity (ASCII) less the line terminators at the end, and no check of
  `decode_record` can fail;
- the header splits at the same places (`str.split` and the HDFS pattern read the same fields);
- the event time is the same IEEE arithmetic (BGL: timestamp + micros / 1e6; HDFS: whole seconds
  from the `calendar.timegm` formula, a table of month starts and integer sums);
- the template is the content with every space-separated token that holds a digit or `/`, or is
  a run of 8 or more hex letters, replaced by `<*>` (`masking.mask`): split at single spaces (a
  run of spaces gives empty tokens, which the join restores), each *distinct* token tested once
  (dictionary encoding: tokens repeat across lines), joined back;
- block ids: `masking.block_ids`, read off the same distinct tokens (an id never spans a space;
  the header fields of free text are checked on their own), skipped for a batch whose bytes name no
  `blk_` (one byte search over the batch's buffer).

Every other record (a tab or an inner line break, non-ASCII text, odd spacing, control characters,
a broken header, an empty content, too large, empty, undecodable) is left to the per-line parser,
which stays the reference: the differential tests (`tests/unit/test_parse_batch.py`) compare both
on every shared sample line and on generated good and bad records.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from logstream.masking import BLOCK_ID, MASK, block_ids

_DATE = r"^[0-9]{4}\.[0-9]{2}\.[0-9]{2}$"  # the date field of BGL, Thunderbird, Liberty: yyyy.mm.dd
_STAMP_DIGITS = 15  # the timestamp field: 1-15 digits (every such integer is exact in a double)
_HDFS_DATE = r"^[0-9]{2}(?:0[1-9]|1[0-2])[0-9]{2}$"  # yymmdd with a month of 1-12, as timegm needs
_MICROS = r"(?:^|\.)[0-9]{6}$"  # BGL Time field: six digits after its last dot (or the whole field)
_VARIABLE_CHAR = r"[0-9/]"  # a token masking.mask replaces for a digit or slash in it
_HEX_TOKEN = r"^[A-Fa-f]{8,}$"  # a token masking.mask replaces as a hex id
_BLOCK = re.compile(rb"blk_")

# Days from the epoch to the first of each month of 2000-2099 (HDFS years are 2000 + yy).
_MONTH_DAYS = pa.array([calendar.timegm((2000 + year, month, 1, 0, 0, 0)) // 86_400
                        for year in range(100) for month in range(1, 13)], pa.int64())


@dataclass(frozen=True, slots=True)
class _Layout:
    fields: int  # header fields before the content
    labelled: bool  # BGL, Thunderbird, Liberty: the first field is the label ("-" = normal), split at
    # whitespace runs (`str.split()`), timestamp and date in fields 1 and 2; HDFS: split at single spaces

    @property
    def free_fields(self) -> tuple[int, ...]:
        """Header fields of free text; the shape check holds the others to digits and dots (labelled:
        timestamp and date; HDFS: date, time and pid)."""
        return (0, *range(3, self.fields)) if self.labelled else tuple(range(3, self.fields))


_LAYOUTS = {
    "bgl": _Layout(9, True),
    "thunderbird": _Layout(8, True),
    "liberty": _Layout(8, True),
    "hdfs": _Layout(5, False),
}


@dataclass(slots=True)
class PlainLines:
    """The plain records of a batch, parsed: `rows` are their indices in the batch (ascending); the
    other lists are parallel to `rows` (raw text, template, event time in epoch seconds, label or
    None, block ids in first-occurrence order)."""

    rows: list[int]
    raw: list[str]
    templates: list[str]
    event_times: list[float]
    labels: list[bool | None]
    blocks: list[tuple[str, ...]]


def vector_formats() -> frozenset[str]:
    """The formats `ArrowBatchParser` reads (the generic format keeps per-line state: not here)."""
    return frozenset(_LAYOUTS)


class ArrowBatchParser:
    """Parses the plain records of a batch of one fixed-header format with Arrow kernels.

    Stateless between batches; `max_line_bytes` is the record size limit of `decode_record`.
    Raises ValueError for a format it does not read (see `vector_formats`)."""

    def __init__(self, fmt: str, max_line_bytes: int) -> None:
        try:
            self._layout = _LAYOUTS[fmt]
        except KeyError:
            raise ValueError(f"no vectorized parser for format {fmt!r}") from None
        self.format = fmt
        self.max_line_bytes = max_line_bytes

    def parse(self, values: Sequence[bytes | None]) -> PlainLines:
        """Parse the plain records among `values` (None: a record without a value, never plain)."""
        data = pa.array(values, pa.binary())
        if isinstance(data, pa.ChunkedArray):  # over 2 GiB in all (a raised --max-line-bytes): per line
            return PlainLines([], [], [], [], [], [])
        # Printable ASCII once the terminators at the end are gone (bytes: the text of a non-UTF-8
        # record is never read as such, every kernel here looks at single bytes until it is refused).
        text = pc.ascii_rtrim(data.view(pa.string()), characters="\r\n")
        plain = pc.ascii_is_printable(text)
        lengths = pc.binary_length(data)
        if (pc.max(lengths).as_py() or 0) > self.max_line_bytes:
            plain = pc.and_(plain, pc.less_equal(lengths, self.max_line_bytes))
        rows, text = _keep(pc.fill_null(plain, False), None, text)
        if not rows:
            return PlainLines([], [], [], [], [], [])
        layout = self._layout
        if layout.labelled:
            parts = pc.ascii_split_whitespace(text, max_splits=layout.fields)
        else:
            parts = pc.split_pattern(text, " ", max_splits=layout.fields)
        for shape in (_has_fields, _labelled_shape if layout.labelled else _hdfs_shape):
            rows, text, parts = _keep(shape(parts, layout.fields), rows, text, parts)
            if not rows:
                return PlainLines([], [], [], [], [], [])
        count = len(rows)
        content = pc.list_element(parts, layout.fields)
        raw = text.to_pylist()
        if self.format == "bgl":
            times = _bgl_times(parts)
        elif self.format == "hdfs":
            times = _hdfs_times(parts)
        else:
            times = pc.cast(pc.list_element(parts, 1), pa.float64())
        labels: list[bool | None]
        if layout.labelled:
            labels = pc.not_equal(pc.list_element(parts, 0), "-").to_pylist()
        else:
            labels = [None] * count
        tokens = _Tokens(content)
        return PlainLines(rows, raw, tokens.templates(), times.to_pylist(), labels,
                          tokens.blocks(text, parts, layout.free_fields, raw))


def _keep(keep: pa.BooleanArray, rows: list[int] | None,
          *columns: pa.Array) -> tuple[list[int], *tuple[pa.Array, ...]]:
    """The rows where `keep` holds: their batch indices (`rows`: the indices of the current rows, None
    for the whole batch) and each column filtered to them (unfiltered when every row holds)."""
    kept = pc.sum(keep).as_py() or 0
    if kept == len(keep):
        return (list(range(kept)) if rows is None else rows, *columns)
    if kept == 0:
        return ([], *columns)
    where = pc.indices_nonzero(keep).to_pylist()
    picked = where if rows is None else [rows[i] for i in where]
    return (picked, *(pc.filter(column, keep) for column in columns))


def _has_fields(parts: pa.ListArray, fields: int) -> pa.BooleanArray:
    """Split lines with every header field and a content (the fields the shape checks then read)."""
    return pc.equal(pc.list_value_length(parts), fields + 1)


def _labelled_shape(parts: pa.ListArray, fields: int) -> pa.BooleanArray:
    """`^label +timestamp +yyyy.mm.dd( +field){fields - 3} +content` over a printable line split at
    whitespace runs: no leading space (an empty first part), every header field there, a non-empty
    content (a line of only a header splits into fewer parts or an empty last one)."""
    stamp = pc.list_element(parts, 1)
    return _all(
        pc.greater(pc.binary_length(pc.list_element(parts, 0)), 0),
        pc.ascii_is_decimal(stamp),
        pc.less_equal(pc.binary_length(stamp), _STAMP_DIGITS),
        pc.match_substring_regex(pc.list_element(parts, 2), _DATE),
        pc.greater(pc.binary_length(pc.list_element(parts, fields)), 0),
    )


def _hdfs_shape(parts: pa.ListArray, fields: int) -> pa.BooleanArray:
    r"""`^yymmdd hhmmss pid level component: content` over a printable line split at single spaces (two
    spaces give an empty field): `parse_hdfs`'s pattern `(\d{6}) (\d{6}) (\d+) (\S+) (\S+?):(?: (.*))?$`
    on the lines that have the space after the colon; the content may be empty."""
    clock = pc.list_element(parts, 1)
    component = pc.list_element(parts, fields - 1)  # the last header field
    return _all(
        pc.match_substring_regex(pc.list_element(parts, 0), _HDFS_DATE),
        pc.ascii_is_decimal(clock),
        pc.equal(pc.binary_length(clock), 6),
        pc.ascii_is_decimal(pc.list_element(parts, 2)),
        pc.greater(pc.binary_length(pc.list_element(parts, 3)), 0),
        pc.ends_with(component, ":"),
        pc.greater(pc.binary_length(component), 1),
    )


def _all(*conditions: pa.BooleanArray) -> pa.BooleanArray:
    """Row-wise AND of the conditions (no condition has a missing value: the lines are not null and
    have every field)."""
    result = conditions[0]
    for condition in conditions[1:]:
        result = pc.and_(result, condition)
    return result


def _bgl_times(parts: pa.ListArray) -> pa.DoubleArray:
    """Timestamp plus the Time field's micros where it has six digits after its last dot."""
    stamp = pc.cast(pc.list_element(parts, 1), pa.float64())
    clock = pc.list_element(parts, 4)
    has_micros = pc.match_substring_regex(clock, _MICROS)
    micros = pc.if_else(has_micros, pc.utf8_slice_codeunits(clock, -6), "0")
    return pc.add(stamp, pc.divide(pc.cast(pc.cast(micros, pa.int64()), pa.float64()), 1e6))


def _hdfs_times(parts: pa.ListArray) -> pa.DoubleArray:
    """`calendar.timegm((2000 + yy, mm, dd, hh, mi, ss))` in integers: month start + days + seconds."""
    date = pc.cast(pc.list_element(parts, 0), pa.int64())  # yymmdd
    clock = pc.cast(pc.list_element(parts, 1), pa.int64())  # hhmmss
    year_month = pc.divide(date, 100)  # yymm
    year = pc.divide(year_month, 100)
    month = pc.subtract(year_month, pc.multiply(year, 100))
    day = pc.subtract(date, pc.multiply(year_month, 100))
    month_start = pc.take(_MONTH_DAYS, pc.add(pc.multiply(year, 12), pc.subtract(month, 1)))
    hours = pc.divide(clock, 10_000)
    minutes_of = pc.divide(clock, 100)  # hhmm
    minutes = pc.subtract(minutes_of, pc.multiply(hours, 100))
    seconds = pc.subtract(clock, pc.multiply(minutes_of, 100))
    days = pc.add(month_start, pc.subtract(day, 1))
    total = pc.add(pc.add(pc.multiply(days, 86_400), pc.multiply(hours, 3_600)),
                   pc.add(pc.multiply(minutes, 60), seconds))
    return pc.cast(total, pa.float64())


class _Tokens:
    """The space-separated tokens of the contents of plain records (their only whitespace is the space),
    dictionary-encoded: each rule looks at each *distinct* token once (tokens repeat across lines)."""

    def __init__(self, content: pa.StringArray) -> None:
        self.lists = pc.split_pattern(content, " ")  # a run of spaces gives empty tokens: the join restores it
        encoded = pc.dictionary_encode(pc.list_flatten(self.lists))
        self.distinct: pa.StringArray = encoded.dictionary
        self.indices: pa.Int32Array = encoded.indices  # per token, in line order: its distinct token

    def templates(self) -> list[str]:
        """`masking.mask` of each content: each token with a digit or `/` in it, or all of it 8+ hex letters,
        replaced by `<*>`, joined with single spaces."""
        distinct = self.distinct
        variable = pc.or_(pc.match_substring_regex(distinct, _VARIABLE_CHAR),
                          pc.match_substring_regex(distinct, _HEX_TOKEN))
        masked = pc.take(pc.if_else(variable, MASK, distinct), self.indices)
        return pc.binary_join(pa.ListArray.from_arrays(self.lists.offsets, masked), " ").to_pylist()

    def blocks(self, text: pa.StringArray, parts: pa.ListArray, free_fields: tuple[int, ...],
               raw: list[str]) -> list[tuple[str, ...]]:
        """`masking.block_ids` of each line: a block id never spans a space, so the line's ids are those of
        its tokens in order (each distinct token searched once, its tuple shared by the lines naming
        it), repeats dropped; a line with `blk_` in a header field of free text (`free_fields`: the
        others hold only digits and dots) takes `block_ids` itself. A batch whose bytes name no
        `blk_` at all skips the search."""
        count = len(raw)
        data = text.buffers()[2]  # a filtered array's buffer may hold bytes of other rows: a false yes at worst
        if data is None or _BLOCK.search(memoryview(data)) is None:
            return [()] * count
        named = pc.match_substring(self.distinct, "blk_")
        blocks: list[tuple[str, ...]] = [()] * count
        if pc.any(named).as_py():
            ids = {index: tuple(BLOCK_ID.findall(token)) for index, token in
                   zip(pc.indices_nonzero(named).to_pylist(), pc.filter(self.distinct, named).to_pylist())}
            at = pc.indices_nonzero(pc.take(named, self.indices))  # tokens, in line order, that name a block
            lines = pc.take(pc.list_parent_indices(self.lists), at).to_pylist()
            for row, index in zip(lines, pc.take(self.indices, at).to_pylist()):
                found, before = ids[index], blocks[row]
                if found:  # most lines: one token naming one block, its shared tuple
                    blocks[row] = found if not before and len(found) < 2 else tuple(dict.fromkeys(before + found))
        for field in free_fields:
            in_header = pc.match_substring(pc.list_element(parts, field), "blk_")
            if pc.any(in_header).as_py():
                for row in pc.indices_nonzero(in_header).to_pylist():
                    blocks[row] = block_ids(raw[row])
        return blocks
