"""A consume batch parsed in one pass of Arrow compute kernels (RE2 regular expressions, C++ loops).

`LineParser.parse_batch` hands the records of a fixed-header format (HDFS, BGL, Thunderbird,
Liberty) here first. One kernel call finds the batch's *plain* records: ASCII text of the format's
exact header shape, with only printable characters, spaces, tabs and inner newlines (line
terminators only at the end), and no more than the record size limit. For a plain record every
step of the per-line parser (`logstream.parsing`) is a fixed function of its bytes that a kernel
computes for the whole batch at once:

- decoding is the identity (ASCII) less the line terminators at the end, and no check of
  `decode_record` can fail;
- the header splits at the same places (`str.split` and the HDFS pattern read the same fields);
- the event time is the same IEEE arithmetic (BGL: timestamp + micros / 1e6; HDFS: whole seconds
  from the `calendar.timegm` formula, a table of month starts and integer sums);
- the template is the content with every whitespace-separated token that holds a digit or `/`, or
  is a run of 8 or more hex letters, replaced by `<*>` (`masking.mask`). A batch whose contents
  hold no tab or newline (the only whitespace besides the space a plain record has) is masked token
  by token: split at single spaces (a run of spaces gives empty tokens, which the join restores),
  each *distinct* token tested once (dictionary encoding: tokens repeat across lines), joined
  back. Otherwise the whole-content RE2 rule, with `masking.mask` itself where the hex rule may
  apply (it needs a lookaround RE2 has not);
- block ids: `masking.block_ids` on the decoded lines, skipped for a batch whose bytes name no
  `blk_` (one byte search over the batch's buffer).

Every other record (non-ASCII text, odd spacing, control characters, a broken header, an empty
content, too large, empty, undecodable) is left to the per-line parser, which stays the reference:
the differential tests (`tests/unit/test_parse_batch.py`) compare both on every shared sample
line and on generated good and bad records.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from logstream.masking import BLOCK_ID, MASK, block_ids, mask

# Characters a plain record may hold: printable ASCII, space, tab and (inside) newline.
_BODY = r"(?:[\t\n -~]*[\t -~])?[\r\n]*"  # a run of them not ending with a newline, then line terminators
_TOKEN = r"[!-~]+"  # a header field: printable, no whitespace
_STAMP = r"[0-9]{1,15} +[0-9]{4}\.[0-9]{2}\.[0-9]{2}"  # unix time (exact in a double) and yyyy.mm.dd
# BGL: <Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> <Content>
_BGL = rf"^{_TOKEN} +{_STAMP}(?: +{_TOKEN}){{6}} +[!-~]{_BODY}$"
# Thunderbird, Liberty: <Label> <Timestamp> <Date> <Admin> <Month> <Day> <Time> <AdminAddr> <Content>
_THUNDERBIRD = rf"^{_TOKEN} +{_STAMP}(?: +{_TOKEN}){{5}} +[!-~]{_BODY}$"
# HDFS: <yymmdd> <hhmmss> <Pid> <Level> <Component>: <Content>; the month is checked (1-12), as timegm does
_HDFS = rf"^[0-9]{{2}}(?:0[1-9]|1[0-2])[0-9]{{2}} [0-9]{{6}} [0-9]+ {_TOKEN} {_TOKEN}: {_BODY}$"
_MICROS = r"(?:^|\.)[0-9]{6}$"  # BGL Time field: six digits after its last dot (or the whole field)
_VARIABLE = r"\S*[0-9/]\S*"  # a token with a digit or a slash (masking.mask's first rule)
_HEX_RUN = r"[A-Fa-f]{8}"  # a content that masking.mask's hex rule may touch
_VARIABLE_CHAR = r"[0-9/]"  # a token masking.mask replaces for a digit or slash in it
_HEX_TOKEN = r"^[A-Fa-f]{8,}$"  # a token masking.mask replaces as a hex id

# Days from the epoch to the first of each month of 2000-2099 (HDFS years are 2000 + yy).
_MONTH_DAYS = pa.array([calendar.timegm((2000 + year, month, 1, 0, 0, 0)) // 86_400
                        for year in range(100) for month in range(1, 13)], pa.int64())


@dataclass(frozen=True, slots=True)
class _Layout:
    plain: str  # the pattern of a plain record
    fields: int  # header fields before the content
    labelled: bool  # the first field is the label ("-" = normal)


_LAYOUTS = {
    "bgl": _Layout(_BGL, 9, True),
    "thunderbird": _Layout(_THUNDERBIRD, 8, True),
    "liberty": _Layout(_THUNDERBIRD, 8, True),
    "hdfs": _Layout(_HDFS, 5, False),
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
        plain = pc.match_substring_regex(data, self._layout.plain)
        lengths = pc.binary_length(data)
        if (pc.max(lengths).as_py() or 0) > self.max_line_bytes:
            plain = pc.and_(plain, pc.less_equal(lengths, self.max_line_bytes))
        plain = pc.fill_null(plain, False)
        count = pc.sum(plain).as_py() or 0
        if count == 0:
            return PlainLines([], [], [], [], [], [])
        if count < len(values):
            rows = pc.indices_nonzero(plain).to_pylist()
            data = pc.filter(data, plain)
        else:
            rows = list(range(len(values)))
        text = pc.utf8_rtrim(data.view(pa.string()), characters="\r\n")  # ASCII: valid UTF-8 as it is
        layout = self._layout
        if layout.labelled:
            parts = pc.ascii_split_whitespace(text, max_splits=layout.fields)
        else:
            parts = pc.split_pattern(text, " ", max_splits=layout.fields)
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
        return PlainLines(rows, raw, _templates(content), times.to_pylist(), labels, _blocks(text, raw))


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


def _templates(content: pa.StringArray) -> list[str]:
    """`masking.mask` of each content: token by token where the only whitespace is the space, else RE2
    for the digit/slash rule and `mask` itself where the hex rule may apply."""
    if not _holds_any(content, (b"\t", b"\n")):
        return _token_templates(content)
    templates = pc.replace_substring_regex(content, _VARIABLE, MASK).to_pylist()
    hex_rows = pc.match_substring_regex(content, _HEX_RUN)
    if pc.any(hex_rows).as_py():
        for row in pc.indices_nonzero(hex_rows).to_pylist():
            templates[row] = mask(content[row].as_py())
    return templates


def _blocks(text: pa.StringArray, raw: list[str]) -> list[tuple[str, ...]]:
    """`masking.block_ids` of each line: its matches in order, a line naming a block twice through the
    function itself (a batch naming no `blk_` at all skips the search)."""
    if not _holds_any(text, (b"blk_",)):
        return [()] * len(raw)
    found = list(map(BLOCK_ID.findall, raw))
    blocks = list(map(tuple, found))
    for row in [row for row, ids in enumerate(found) if len(ids) > 1]:
        blocks[row] = block_ids(raw[row])
    return blocks


def _token_templates(content: pa.StringArray) -> list[str]:
    """`masking.mask` of contents whose only whitespace is the space: split at each space, each distinct
    token masked once (a digit or `/` in it, or all of it 8+ hex letters), joined with single spaces."""
    tokens = pc.split_pattern(content, " ")
    encoded = pc.dictionary_encode(pc.list_flatten(tokens))
    distinct = encoded.dictionary
    variable = pc.or_(pc.match_substring_regex(distinct, _VARIABLE_CHAR),
                      pc.match_substring_regex(distinct, _HEX_TOKEN))
    masked = pc.take(pc.if_else(variable, MASK, distinct), encoded.indices)
    return pc.binary_join(pa.ListArray.from_arrays(tokens.offsets, masked), " ").to_pylist()


def _holds_any(strings: pa.StringArray, needles: tuple[bytes, ...]) -> bool:
    """Whether any needle occurs in the bytes under `strings` (a byte search over its data buffer; a
    sliced or filtered array's buffer may hold bytes of rows outside it: a false yes, never a false no)."""
    data = strings.buffers()[2]
    if data is None:
        return False
    whole = data.to_pybytes()
    return any(needle in whole for needle in needles)
