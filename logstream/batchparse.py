"""A consume batch of a fixed-header format parsed in one compiled pass over its bytes.

`LineParser.parse_batch` hands the records of a fixed-header format (HDFS, BGL, Thunderbird,
Liberty) here first. The batch is laid out as one Arrow binary array (one buffer of bytes and the
records' offsets into it) and a loop compiled by numba (LLVM machine code, cached on disk after the
first build) reads each record once, byte by byte, and decides whether it is *plain*: printable
ASCII (no tab, no inner line break, no control character) once the line terminators at the end are
trimmed, no larger than the record size limit, with the format's exact header shape. For a plain
record every step of the per-line parser (`logstream.parsing`) is a fixed function of its bytes,
and the loop computes it in the same pass:

- decoding is the identity (ASCII) less the line terminators at the end, and no check of
  `decode_record` can fail;
- the header splits at the same places: runs of spaces for the labelled formats (`str.split()`,
  which on printable ASCII splits at spaces only), single spaces for HDFS (`parse_hdfs`'s pattern);
- the event time is the same IEEE arithmetic: a timestamp of at most 15 digits is an exact double
  (`float(stamp)`), BGL adds `int(micros) / 1e6`, HDFS sums whole seconds from the
  `calendar.timegm` formula (a table of month starts, made by `calendar.timegm` itself);
- the template is the content with every space-separated token that holds a digit or `/`, or is
  all of it 8 or more hex letters, replaced by `<*>` (`masking.mask`), the spaces kept as they
  were (a run of spaces is empty tokens between single spaces);
- block ids are `masking.BLOCK_ID` (`blk_`, an optional `-`, digits) found left to right over the
  whole line, without overlap, as `re.findall` finds them, repeats dropped; an id holds no space, so
  they are looked for token by token: in the header only when it holds a `_`, in the content by the
  masking step, in the tokens holding a `_` and a digit.

Every other record (non-ASCII text, control characters, a tab, odd spacing in a header, a broken
header, an empty content where the format needs one, too large, empty, no value) is left to the
per-line parser, which stays the reference: the differential tests (`tests/unit/test_parse_batch.py`)
compare both on every shared sample line and on generated good and bad records.

The strings handed back (raw line, template, block ids) are made from the loop's output buffers by
Arrow (`to_pylist`), one C loop per column.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from numba import njit

from logstream.logs import get_logger

log = get_logger(__name__)

_SPACE, _DOT, _SLASH, _COLON, _DASH = 32, 46, 47, 58, 45
_STAMP_DIGITS = 15  # the timestamp field: 1-15 digits (every such integer is exact in a double)

# Days from the epoch to the first of each month of 2000-2099 (HDFS years are 2000 + yy).
_MONTH_DAYS = np.array([calendar.timegm((2000 + year, month, 1, 0, 0, 0)) // 86_400
                        for year in range(100) for month in range(1, 13)], np.int64)


@dataclass(frozen=True, slots=True)
class _Layout:
    fields: int  # header fields before the content
    labelled: bool  # BGL, Thunderbird, Liberty: label, timestamp, date, ... split at runs of spaces;
    # HDFS: date, time, pid, level, component, split at single spaces
    micros: bool  # BGL: the Time field (the fifth) adds its six digits after the last dot


_LAYOUTS = {
    "bgl": _Layout(9, True, True),
    "thunderbird": _Layout(8, True, False),
    "liberty": _Layout(8, True, False),
    "hdfs": _Layout(5, False, False),
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


class BatchParser:
    """Parses the plain records of a batch of one fixed-header format in one compiled pass.

    Stateless between batches; `max_line_bytes` is the record size limit of `decode_record`.
    Raises ValueError for a format it does not read (the generic one keeps per-line state). Building the first one
    in a process compiles the loop (a few seconds; ~6 s on a 2-vCPU machine) or loads it from numba's
    on-disk cache (~0.55 s, after ~0.3 s to import numba), so that cost is paid before any record is read."""

    def __init__(self, fmt: str, max_line_bytes: int) -> None:
        try:
            self._layout = _LAYOUTS[fmt]
        except KeyError:
            raise ValueError(f"no batch parser for format {fmt!r}") from None
        self.format = fmt
        self.max_line_bytes = max_line_bytes
        # the loop takes a 64-bit limit; a record in one Arrow binary array is under 2 GiB, so any larger
        # limit (up to `float("inf")`) is the same limit
        self._limit = int(max_line_bytes) if max_line_bytes < 2**31 else 2**31
        _warm()

    def parse(self, values: Sequence[bytes | None]) -> PlainLines:
        """Parse the plain records among `values` (None: a record without a value, never plain)."""
        data = pa.array(values, pa.binary())
        if isinstance(data, pa.ChunkedArray):  # over 2 GiB in all (a raised --max-line-bytes): per line
            return _none()
        return _plain_lines(data, self._layout, self._limit)


def _plain_lines(data: pa.BinaryArray, layout: _Layout, max_line_bytes: int) -> PlainLines:
    """The plain records of `data` (one Arrow binary array, the batch's records in order) parsed."""
    count = len(data)
    buffers = data.buffers()
    if count == 0 or buffers[2] is None:  # no bytes at all: every record empty or without a value
        return _none()
    offsets = np.frombuffer(buffers[1], np.int32, count + 1, data.offset * 4)
    text = np.frombuffer(buffers[2], np.uint8)
    size = int(offsets[-1])
    out = _Out(count, size)
    plain, raw_end, template_end, ids, id_end = _scan(
        text, offsets, not layout.labelled, layout.fields, layout.micros, max_line_bytes, _MONTH_DAYS,
        out.rows, out.raw, out.raw_offsets, out.templates, out.template_offsets, out.times, out.labels,
        out.ids, out.id_offsets, out.line_ids)
    if plain == 0:
        return _none()
    labels: list[bool | None]
    labels = out.labels[:plain].astype(bool).tolist() if layout.labelled else [None] * plain
    return PlainLines(
        out.rows[:plain].tolist(),
        data.view(pa.string()).to_pylist() if raw_end < 0 else _strings(plain, out.raw_offsets, out.raw, raw_end),
        _strings(plain, out.template_offsets, out.templates, template_end),
        out.times[:plain].tolist(),
        labels,
        _blocks(plain, out, ids, id_end),
    )


def _none() -> PlainLines:
    return PlainLines([], [], [], [], [], [])


class _Out:
    """The loop's output arrays for a batch of `count` records holding `size` bytes; the loop fills the
    first `plain` entries (`plain + 1` offsets). A template is at most three times its content (a
    one-byte token becomes `<*>`), and a block id takes at least five bytes (`blk_0`)."""

    def __init__(self, count: int, size: int) -> None:
        self.rows = np.empty(count, np.int64)
        self.raw = np.empty(size, np.uint8)
        self.raw_offsets = np.empty(count + 1, np.int64)
        self.templates = np.empty(3 * size, np.uint8)
        self.template_offsets = np.empty(count + 1, np.int64)
        self.times = np.empty(count, np.float64)
        self.labels = np.empty(count, np.uint8)
        self.ids = np.empty(size, np.uint8)
        self.id_offsets = np.empty(size // 5 + 2, np.int64)
        self.line_ids = np.empty(count + 1, np.int64)  # per plain line: its first id's index in the id list


def _strings(count: int, offsets: np.ndarray, data: np.ndarray, end: int) -> list[str]:
    """The first `count` strings of a (offsets, bytes) pair as Python str (the bytes are ASCII)."""
    return pa.Array.from_buffers(pa.large_string(), count,
                                 [None, pa.py_buffer(offsets[:count + 1]), pa.py_buffer(data[:end])]).to_pylist()


def _blocks(plain: int, out: _Out, ids: int, id_end: int) -> list[tuple[str, ...]]:
    """Each plain line's block ids as `masking.block_ids` gives them (the loop dropped repeats).

    The tuples are made at C speed (`zip` over the ids' strings) and the lines take theirs by index from one
    table: every id alone, then `()`, then the pairs (a line naming two blocks: about one HDFS line in
    eight); only a line naming three or more (rare) builds its own."""
    if ids == 0:
        return [()] * plain
    names = _strings(ids, out.id_offsets, out.ids, id_end)
    bounds = out.line_ids[:plain + 1]
    counts = bounds[1:] - bounds[:-1]
    if ids == plain and counts.max() == 1:  # every line names exactly one block
        return list(zip(names))
    table: list[tuple[str, ...]] = list(zip(names))
    table.append(())  # at `ids`: a line without a block id
    index = bounds[:-1].copy()
    index[counts == 0] = ids
    pairs = np.flatnonzero(counts == 2)
    if len(pairs):
        firsts = bounds[pairs]
        index[pairs] = np.arange(len(table), len(table) + len(pairs))
        table += zip(map(names.__getitem__, firsts.tolist()), map(names.__getitem__, (firsts + 1).tolist()))
    for row in np.flatnonzero(counts > 2).tolist():
        index[row] = len(table)
        table.append(tuple(names[bounds[row]:bounds[row + 1]]))
    return list(map(table.__getitem__, index.tolist()))


_warmed = False


def _warm() -> None:
    """Compile the loop (or load it from numba's cache) for the argument types `parse` passes it."""
    global _warmed
    if not _warmed:
        if _uncached:
            log.warning("batch_parser_uncached", functions=_uncached,
                        consequence="numba found no writable cache directory: the batch parser is compiled "
                        "at every start (a few seconds)", action="set NUMBA_CACHE_DIR to a writable directory")
        sample = [b"- 1 2005.06.03 a 2005-06-03-15.42.50.675872 b c d e blk_1 x/1 deadbeef"]
        _plain_lines(pa.array(sample, pa.binary()), _LAYOUTS["bgl"], 1 << 20)
        _warmed = True


# --- the compiled loop ------------------------------------------------------------------------------
# numba compiles these to machine code on first use, once per machine: the machine code is cached
# beside this file in __pycache__, or where NUMBA_CACHE_DIR says (the images set it to the state
# directory), or in numba's user cache. They read and write only the arrays they are given.

# Byte classes for masking: the space, a byte that makes a token variable (a digit, `/`), a hex letter.
# A token holding a `_` and a digit may hold a block id (`_UNDERSCORE | _DIGIT`).
_SPACE_CLASS, _VARIABLE, _HEX, _UNDERSCORE, _DIGIT = 1, 2, 4, 8, 16
_BYTE_CLASS = np.zeros(256, np.uint8)
_BYTE_CLASS[_SPACE] = _SPACE_CLASS
_BYTE_CLASS[_SLASH] = _VARIABLE
_BYTE_CLASS[48:58] = _VARIABLE | _DIGIT
_BYTE_CLASS[[*range(65, 71), *range(97, 103)]] = _HEX
_BYTE_CLASS[95] = _UNDERSCORE

_uncached: list[str] = []  # functions compiled without the disk cache (no writable place for it)


def _compiled(**options: Any) -> Any:
    """`numba.njit` with the on-disk cache; without it where numba finds no writable directory for the
    cache (a read-only install and home), which numba would otherwise refuse with a RuntimeError on import."""
    def decorate(function: Any) -> Any:
        try:
            return njit(cache=True, **options)(function)
        except RuntimeError:
            _uncached.append(function.__name__)
            return njit(**options)(function)
    return decorate


@_compiled(inline="always")
def _u(index: int) -> Any:
    """`index` (never negative here) as an unsigned integer, to subscript with in the hot loops: numba
    wraps a negative signed index around (`a[-1]`), a test and a select at every access that also keeps
    LLVM from simplifying the loop; an unsigned one needs neither. Only ever an index, never a term
    (numba types uint64 with int64 arithmetic as float64)."""
    return np.uint64(index)


@_compiled(inline="always")
def _digit(byte: int) -> bool:
    return 48 <= byte <= 57


@_compiled(inline="always")
def _digits(text: Any, start: int, stop: int) -> int:
    """The decimal value of text[start:stop], or -1 when a byte there is not a digit (or it is empty)."""
    if stop <= start:
        return -1
    value = 0
    for at in range(start, stop):
        byte = text[_u(at)]
        if not _digit(byte):
            return -1
        value = value * 10 + (byte - 48)
    return value


@_compiled(inline="always")
def _is_digits(text: Any, start: int, stop: int) -> bool:
    """Whether text[start:stop] is one or more decimal digits."""
    if stop <= start:
        return False
    for at in range(start, stop):
        if not _digit(text[_u(at)]):
            return False
    return True


@_compiled(inline="always")
def _holds(text: Any, value: int) -> bool:
    """Whether `value` is one of the bytes of `text` (all of them read: a loop the compiler vectorizes)."""
    found = False
    for byte in text:
        found |= byte == value
    return found


@_compiled(inline="always")
def _mask(content: Any, out: Any, at: int, ids: Any, id_offsets: Any, count: int, first: int) -> tuple[int, int]:
    """`masking.mask` of `content` (printable ASCII: its only whitespace is the space) written at out[at:],
    and the block ids in it appended as `_block_ids` does (`first`: the line's first id); returns the end
    of what was written and the new count of ids.

    Each byte's class is one table lookup (`_BYTE_CLASS`); a token's bytes are copied as they are read,
    then written over by `<*>` when it is variable (the output has room: a template is at most three times
    its content). An id holds no space, so the ids are those of the tokens holding a `_` and a digit,
    in order (`findall` over the whole finds them token by token)."""
    stop = content.shape[0]
    token = 0
    while True:
        end = token
        kinds = 0
        hex_run = _HEX
        while end < stop:
            byte = content[_u(end)]
            kind = _BYTE_CLASS[byte]
            if kind == _SPACE_CLASS:
                break
            out[_u(at + end - token)] = byte
            kinds |= kind
            hex_run &= kind
            end += 1
        if kinds & _VARIABLE or (hex_run and end - token >= 8):
            out[_u(at)] = 60  # <
            out[_u(at + 1)] = 42  # *
            out[_u(at + 2)] = 62  # >
            at += 3
            if kinds & (_UNDERSCORE | _DIGIT) == _UNDERSCORE | _DIGIT:
                count = _block_ids(content[token:end], ids, id_offsets, count, first)
        else:
            at += end - token
        if end >= stop:
            return at, count
        out[_u(at)] = _SPACE
        at += 1
        token = end + 1


@_compiled(inline="always")
def _block_ids(line: Any, ids: Any, id_offsets: Any, count: int, first: int) -> int:
    """`masking.block_ids` of `line` (the whole line or a part of it ending at a space or at the line's
    end): the ids `BLOCK_ID.findall` finds (`blk_-?[0-9]+`, left to right, no overlap), repeats of the
    line's ids (`first` to `count - 1`) dropped (the first kept), each appended to `ids` at
    `id_offsets[count]`; returns the new count of ids.

    The search steps through the line's `_` bytes (fewer than its `b`s): an id holds exactly one, three
    bytes after its start, so taking them in order finds the ids in order; one starting inside the last
    id found is skipped, as `findall` resumes after a match. An id equal to one found before in the line is
    written, then left to be written over."""
    stop = line.shape[0]
    resume = 0  # the end of the last id found: the next one starts there or later
    for at in range(3, stop - 1):
        if line[_u(at)] != 95 or at - 3 < resume or line[_u(at - 3)] != 98 or line[_u(at - 2)] != 108 or \
                line[_u(at - 1)] != 107:
            continue
        digits = at + 1
        if line[_u(digits)] == _DASH:
            digits += 1
        end = digits
        while end < stop and _digit(line[_u(end)]):
            end += 1
        if end > digits:
            start = id_offsets[count]
            write = start
            for k in range(at - 3, end):
                ids[_u(write)] = line[_u(k)]
                write += 1
            resume = end
            if not _seen(ids, id_offsets, first, count, start, write):
                count += 1
                id_offsets[count] = write
    return count


@_compiled(inline="always")
def _seen(ids: Any, id_offsets: Any, first: int, count: int, start: int, stop: int) -> bool:
    """Whether ids[start:stop] equals one of the ids `first` to `count - 1`."""
    size = stop - start
    for other in range(first, count):
        begin = id_offsets[other]
        if id_offsets[other + 1] - begin != size:
            continue
        same = True
        for k in range(size):
            if ids[_u(begin + k)] != ids[_u(start + k)]:
                same = False
                break
        if same:
            return True
    return False


@_compiled()
def _scan(text: Any, offsets: Any, hdfs: bool, fields: int, micros: bool, max_bytes: int, month_days: Any,
          rows: Any, raw: Any, raw_offsets: Any, templates: Any, template_offsets: Any, times: Any, labels: Any,
          ids: Any, id_offsets: Any, line_ids: Any) -> tuple[int, int, int, int, int]:
    """Every record of the batch (text[offsets[r]:offsets[r + 1]]), once: the plain ones parsed into the
    output arrays (see `_Out`). Returns (plain lines, raw bytes, template bytes, block ids, id bytes); raw
    bytes is -1 when every record was plain and had no terminator to trim: `raw` was not written, the
    batch's own bytes are the raw lines.

    Each record is read through a view of its own bytes (`line`, indices from 0), which lets the compiler
    drop negative-index checks and take the printable test many bytes a step."""
    plain = 0
    whole = True  # every record so far plain and untrimmed: `raw` is not written, the batch's own bytes are it
    raw_offsets[0] = 0
    template_offsets[0] = 0
    id_offsets[0] = 0
    line_ids[0] = 0
    id_count = 0
    starts = np.empty(fields, np.int64)
    stops = np.empty(fields, np.int64)
    for record in range(offsets.shape[0] - 1):
        begin = offsets[record]
        end = offsets[record + 1]
        if end - begin > max_bytes:
            continue
        while end > begin and (text[end - 1] == 10 or text[end - 1] == 13):  # the terminators at the end
            end -= 1
        if end == begin:
            continue
        line = text[begin:end]
        size = end - begin
        unprintable = False
        underscore = False  # no `_`: no block id, the search is skipped
        for byte in line:
            unprintable |= (byte < 32) | (byte > 126)
            underscore |= byte == 95
        if unprintable or line[0] == _SPACE:
            continue
        # the header fields, then the content from `at`
        at = 0
        complete = True
        for field in range(fields):
            starts[field] = at
            while at < size and line[_u(at)] != _SPACE:
                at += 1
            stops[field] = at
            if at >= size or at == starts[field]:  # no content after it, or an empty field (two spaces)
                complete = False
                break
            at += 1
            if not hdfs:
                while at < size and line[_u(at)] == _SPACE:
                    at += 1
        if not complete:
            continue
        if hdfs:
            event_time = _hdfs_time(line, starts, stops, month_days)
            if event_time < 0:
                continue
            label = 0
        else:
            if at >= size:  # labelled formats need a content
                continue
            event_time = _labelled_time(line, starts, stops, micros)
            if event_time < 0:
                continue
            label = 0 if stops[0] - starts[0] == 1 and line[starts[0]] == _DASH else 1
        rows[plain] = record
        times[plain] = event_time
        labels[plain] = label
        if whole and (record != plain or end != offsets[record + 1]):  # the first record dropped or trimmed
            whole = False
            raw[:offsets[plain] - offsets[0]] = text[offsets[0]:offsets[plain]]  # the plain records so far
        write = raw_offsets[plain]
        if not whole:  # a loop over a view: LLVM makes it a vectorized copy (a slice assignment is slower)
            copy = raw[write:write + size]
            for k in range(size):
                copy[k] = line[k]
        raw_offsets[plain + 1] = write + size
        first_id = id_count
        if underscore and _holds(line[:at], 95):  # the header's ids come first (it ends at a space: no id
            id_count = _block_ids(line[:at], ids, id_offsets, id_count, first_id)  # runs on into the content)
        template_offsets[plain + 1], id_count = _mask(line[at:], templates, template_offsets[plain],
                                                      ids, id_offsets, id_count, first_id)
        plain += 1
        line_ids[plain] = id_count
    if whole and plain < offsets.shape[0] - 1:  # records dropped at the end: the plain ones are copied
        whole = False
        raw[:offsets[plain] - offsets[0]] = text[offsets[0]:offsets[plain]]
    return plain, -1 if whole else raw_offsets[plain], template_offsets[plain], id_count, id_offsets[id_count]


@_compiled(inline="always")
def _labelled_time(text: Any, starts: Any, stops: Any, micros: bool) -> float:
    """Timestamp (field 2: 1-15 digits), checked against the date (field 3: yyyy.mm.dd), plus BGL's
    micros (the Time field's six digits after its last dot, or all of it); -1 when not that shape."""
    if stops[1] - starts[1] > _STAMP_DIGITS:
        return -1.0
    stamp = _digits(text, starts[1], stops[1])
    date = starts[2]
    if stamp < 0 or stops[2] - date != 10 or text[_u(date + 4)] != _DOT or text[_u(date + 7)] != _DOT:
        return -1.0
    if not _is_digits(text, date, date + 4) or not _is_digits(text, date + 5, date + 7) or \
            not _is_digits(text, date + 8, date + 10):
        return -1.0
    event_time = float(stamp)
    if micros:
        clock, clock_end = starts[4], stops[4]
        after = clock
        for at in range(clock, clock_end):
            if text[_u(at)] == _DOT:
                after = at + 1
        if clock_end - after == 6:
            fraction = _digits(text, after, clock_end)
            if fraction >= 0:
                event_time += fraction / 1e6
    return event_time


@_compiled(inline="always")
def _two(text: Any, at: int) -> int:
    """The two decimal digits at text[at:at + 2] as a number (the caller checked they are digits)."""
    return (text[_u(at)] - 48) * 10 + (text[_u(at + 1)] - 48)


@_compiled(inline="always")
def _hdfs_time(text: Any, starts: Any, stops: Any, month_days: Any) -> float:
    """`<yymmdd> <hhmmss> <pid> <level> <component>:` as `parse_hdfs` reads it: six-digit date (a month
    of 1-12, as `calendar.timegm` needs) and time, a decimal pid, a component ending in a colon after at
    least one byte; the seconds `calendar.timegm` gives; -1 when not that shape."""
    date, clock = starts[0], starts[1]
    if stops[0] - date != 6 or stops[1] - clock != 6 or not _is_digits(text, date, date + 6) or \
            not _is_digits(text, clock, clock + 6) or not _is_digits(text, starts[2], stops[2]):
        return -1.0
    component_end = stops[4]
    if component_end - starts[4] < 2 or text[_u(component_end - 1)] != _COLON:
        return -1.0
    month = _two(text, date + 2)
    if month < 1 or month > 12:
        return -1.0
    days = month_days[_two(text, date) * 12 + month - 1] + _two(text, date + 4) - 1
    seconds = _two(text, clock) * 3_600 + _two(text, clock + 2) * 60 + _two(text, clock + 4)
    return float(days * 86_400 + seconds)
