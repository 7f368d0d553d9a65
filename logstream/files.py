"""Reading log dumps (plain or gzip) into `LogLine`s through the same parser as the consumer.

Files are streamed line by line, never loaded whole. A file line's "offset" is its 0-based line
number and its topic is the file name, so windows built from a file have the same shape (and the
same deterministic ids for the same lines) as windows built from a topic.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from logstream.parsing import BadRecord, LineParser
from logstream.records import LogLine


def open_binary(path: Path) -> BinaryIO:
    """Open a log file for reading bytes, transparently un-gzipping `.gz` files."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


UTF8_BOM = b"\xef\xbb\xbf"
CSV_ENCODING = "utf-8-sig"  # label and LogLLM CSV files: a byte-order mark is not part of the header


def iter_records(path: Path) -> Iterator[bytes]:
    """The raw records of a file, one per line (split at `\n`), with line terminators kept (the
    parser removes them, `\r\n` or a stray `\r` too). A UTF-8 byte-order mark opening the file is
    not part of its first record."""
    with open_binary(path) as handle:
        first = handle.readline()
        if not first:
            return
        yield first[len(UTF8_BOM):] if first.startswith(UTF8_BOM) else first
        yield from handle


def iter_log_lines(
    path: Path,
    parser: LineParser,
    *,
    topic: str | None = None,
    bad: Counter[str] | None = None,
) -> Iterator[LogLine]:
    """Parsed lines of a file; unparseable lines are skipped and counted by reason in `bad`."""
    name = topic or path.name
    for number, record in enumerate(iter_records(path)):
        try:
            yield parser.parse(record, topic=name, partition=0, offset=number, record_time=0.0)
        except BadRecord as exc:
            if bad is not None:
                bad[exc.reason] += 1


def read_block_labels(path: Path) -> dict[str, bool]:
    """`BlockId,Label` (Normal/Anomaly) -> {block: anomalous}; a malformed row is an error, not a guess."""
    result: dict[str, bool] = {}
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding=CSV_ENCODING, newline="") as text:
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["BlockId", "Label"]:
            raise ValueError(f"{path}: expected a `BlockId,Label` header, got {header!r}")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2 or row[1].strip().lower() not in ("normal", "anomaly"):
                raise ValueError(f"{path}:{number}: expected `<block id>,Normal|Anomaly`, got {row!r}")
            result[row[0].strip()] = row[1].strip().lower() == "anomaly"
    if not result:
        raise ValueError(f"{path}: no block labels")
    return result
