"""Labelled train/test windows from historical log dumps, made by the consumer's own code.

Every line goes through `logstream.parsing.LineParser` (via `logstream.files.iter_log_lines`) and
every window through `logstream.windows.make_windower`, so a model is trained and evaluated on
exactly the windows the consumer will judge. Files are streamed (plain or `.gz`); only the windows
that are returned are held in memory.

Splits follow the LogLLM paper:
- HDFS: one session window per block id (a line naming several blocks joins each); the label of a
  window is its block's label in `anomaly_label.csv` (`BlockId,Label`, `Normal`/`Anomaly`). Blocks
  are split at random 80/20 with a fixed seed *before* windowing, so every session of a block lands
  on the same side. The session gap defaults to `HDFS_SESSION_GAP_S` (one day), as in the
  consumer with `--format hdfs`: HDFS blocks stay quiet for hours between lines.
- BGL, Thunderbird, Liberty: the file's lines are split chronologically by position (the first
  `train_fraction` of the records train, the rest test) and *then* each part is windowed on its own
  (count windows, 100/100 by default), so no window straddles the boundary and nothing from the
  future leaks into training. A window is anomalous if any of its lines is.

`max_windows` caps each split separately (train and test each keep at most that many windows): a
seeded, stratified sample that keeps the split's share of anomalous windows (at least one anomalous
and one normal window when the split has them), returned in stream order. For HDFS the blocks are
chosen before the second pass, so unchosen blocks are never held in memory.

`assume_normal` is for unsupervised training on dumps without ground truth (LogLLaMA
`--assume-normal`): every window is labelled normal, HDFS needs no label file, and line labels of
the other formats are ignored.

Liberty is also accepted in the LogLLM preprocessed CSV layout (`line_no,window,label,content`,
recognised by its header): content-only rows, labelled per line, in stream order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logstream.files import CSV_ENCODING, iter_log_lines, iter_records, open_binary, read_block_labels
from logstream.logs import get_logger
from logstream.parsing import LineParser, block_ids, line_breaks, mask
from logstream.records import LogLine, Window
from logstream.settings import HDFS_SESSION_GAP_S
from logstream.windows import make_windower

log = get_logger(__name__)

DATASETS = ("hdfs", "bgl", "thunderbird", "liberty")
FORMATS = {"hdfs": "hdfs", "bgl": "bgl", "thunderbird": "thunderbird", "liberty": "liberty"}

# The HDFS session gap (one day) is the consumer's own default for --format hdfs (logstream.settings).
# With a one-day gap, every block of the last day is open at once (hundreds of thousands on the full
# HDFS log); the consumer's 100,000 would close sessions early, so the trainer allows far more.
HDFS_SESSION_MAX_OPEN = 10_000_000
SESSION_OPTIONS = ("gap", "grace", "max_lines", "max_open", "max_future", "future_policy", "future_confirm")
LOGLLM_CSV_HEADER = ["line_no", "window", "label", "content"]  # read with files.CSV_ENCODING (a BOM is no header)


@dataclass(slots=True)
class LabeledWindow:
    """A window as the consumer would close it, with its ground truth."""

    window: Window
    label: bool  # True = anomalous


@dataclass
class Split:
    """Train and test windows of one dump, plus what happened while making them (see `load_split`)."""

    train: list[LabeledWindow]
    test: list[LabeledWindow]
    stats: dict[str, Any] = field(default_factory=dict)

    def part(self, name: str) -> list[LabeledWindow]:
        """`train`, `test`, or `all` (train then test)."""
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        if name == "all":
            return self.train + self.test
        raise ValueError(f"unknown split part {name!r}; choose train, test or all")


# --- public API -------------------------------------------------------------------------------


def load_split(
    dataset: str,
    logs: Path,
    labels: Path | None = None,
    *,
    seed: int = 42,
    train_fraction: float = 0.8,
    window_size: int = 100,
    window_stride: int | None = None,
    max_windows: int | None = None,
    assume_normal: bool = False,
    **session_options: Any,
) -> Split:
    """Windows of a dump split as in the paper (see the module docstring).

    `window_size` / `window_stride` shape the count windows of BGL, Thunderbird and Liberty.
    `session_options` (HDFS only) are the session windower's `gap`, `grace`, `max_lines`, `max_open`
    and event-time bound (`max_future` seconds, `future_policy`, `future_confirm`: a line from a
    clock far ahead is skipped as `future_timestamp` or clamped, as the consumer does); unset ones
    take the consumer's defaults, except `gap` and `max_open` (HDFS values) and the bound (none).
    `assume_normal` labels every window normal (no label file for HDFS; line labels ignored).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be between 0 and 1 (exclusive), got {train_fraction}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    unknown = set(session_options) - set(SESSION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown session option(s) {sorted(unknown)}; known: {', '.join(SESSION_OPTIONS)}")
    logs = Path(logs)
    if not logs.is_file():
        raise FileNotFoundError(f"log file {logs} not found")
    started = time.perf_counter()
    rng = random.Random(seed)
    if dataset == "hdfs":
        if labels is None and not assume_normal:
            raise ValueError("HDFS labels are per block: pass the block label file (--labels anomaly_label.csv), "
                             "or --assume-normal to treat every block as normal")
        if labels is not None and assume_normal:
            raise ValueError("a label file and assume_normal contradict each other: pass one of them")
        if session_options.get("gap") is not None and session_options["gap"] <= 0:
            raise ValueError("session gap must be positive")
        split = _hdfs_split(logs, Path(labels) if labels is not None else None, rng, train_fraction, max_windows,
                            session_options)
    else:
        if labels is not None:
            raise ValueError(f"{dataset} lines carry their own labels (first field '-' = normal); drop the "
                             "label file")
        if session_options:
            raise ValueError(f"{dataset} uses count windows; session options {sorted(session_options)} do not apply")
        split = _chronological_split(dataset, logs, rng, train_fraction, window_size, window_stride, max_windows,
                                     assume_normal)
    split.stats.update(dataset=dataset, logs=str(logs), labels=str(labels) if labels else None, seed=seed,
                       train_fraction=train_fraction, max_windows=max_windows, assume_normal=assume_normal)
    split.stats["overlap"] = verbatim_overlap(split.train, split.test)
    split.stats["seconds"] = round(time.perf_counter() - started, 3)
    log.info("split_loaded", dataset=dataset, logs=str(logs), train=split.stats["train"], test=split.stats["test"],
             overlap=split.stats["overlap"]["test_windows_in_train"], seconds=split.stats["seconds"])
    return split


def oversample(windows: Sequence[LabeledWindow], beta: float = 0.3, seed: int = 42) -> list[LabeledWindow]:
    """Repeat the minority class (anomalous *or* normal) until it is at least `beta` of the samples.

    The paper's remedy for class imbalance (beta = 0.3). Whole copies first, then a seeded sample
    without replacement for the remainder, so each minority window is repeated at most once more
    than any other. The result (a new list: originals plus copies) is shuffled with `seed`; with one
    class only, or a minority already at `beta`, it is just the shuffled input.
    """
    if not 0.0 < beta <= 0.5:
        raise ValueError(f"beta must be in (0, 0.5], got {beta}")
    rng = random.Random(seed)
    result = list(windows)
    anomalous = [w for w in windows if w.label]
    normal = [w for w in windows if not w.label]
    minority, majority = (anomalous, normal) if len(anomalous) <= len(normal) else (normal, anomalous)
    if not minority:
        log.warning("oversample_single_class", windows=len(result), anomalous=len(anomalous))
    else:
        target = minority_target(len(majority), beta)
        extra = max(0, target - len(minority))
        whole, rest = divmod(extra, len(minority))
        result.extend(minority * whole)
        result.extend(rng.sample(minority, rest))
    rng.shuffle(result)
    return result


def minority_target(majority: int, beta: float) -> int:
    """Smallest minority count m with m / (m + majority) >= beta."""
    target = math.ceil(beta * majority / (1.0 - beta))
    while target > 0 and (target - 1) / (target - 1 + majority) >= beta:
        target -= 1  # guard against float rounding up by one
    while target / (target + majority) < beta:
        target += 1
    return target


def sequence_digest(window: Window) -> bytes:
    """Identity of a window's content: its sequence of masked messages (what the model sees)."""
    digest = hashlib.blake2b(digest_size=16)
    for template in window.templates:
        digest.update(template.encode())
        digest.update(b"\x1e")
    return digest.digest()


def verbatim_overlap(train: Sequence[LabeledWindow], test: Sequence[LabeledWindow]) -> dict[str, int]:
    """How many test windows repeat a train window's masked message sequence exactly.

    Identical windows on both sides make a test score partly a memory test; `label_conflicts`
    counts those whose label differs from the identical train window's.
    """
    seen: dict[bytes, set[bool]] = {}
    for item in train:
        seen.setdefault(sequence_digest(item.window), set()).add(item.label)
    hits = anomalous = conflicts = 0
    for item in test:
        labels = seen.get(sequence_digest(item.window))
        if labels is None:
            continue
        hits += 1
        anomalous += item.label
        conflicts += item.label not in labels
    return {"test_windows_in_train": hits, "anomalous": anomalous, "normal": hits - anomalous,
            "label_conflicts": conflicts}


def summarize(windows: Sequence[LabeledWindow]) -> dict[str, int]:
    anomalous = sum(1 for w in windows if w.label)
    return {"windows": len(windows), "anomalous": anomalous, "normal": len(windows) - anomalous}


# --- line sources -----------------------------------------------------------------------------


def is_logllm_csv(path: Path) -> bool:
    """True when the file is LogLLM's content-only CSV (`line_no,window,label,content` header)."""
    with open_binary(path) as handle:
        first = handle.readline(256)
    return first.decode(CSV_ENCODING, "replace").strip().split(",") == LOGLLM_CSV_HEADER


def iter_logllm_csv(path: Path, bad: Counter[str]) -> Iterator[LogLine]:
    """Rows of a LogLLM CSV as `LogLine`s: masked like any line; label from the `label` column (0/1).

    The layout has no header fields, so there is no event time (0.0, as for records without one)
    and the offset is the 0-based row number.
    """
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding=CSV_ENCODING, newline="") as text:
        reader = csv.reader(text)
        next(reader, None)
        for offset, row in enumerate(reader):
            if len(row) != 4 or row[2] not in ("0", "1"):
                bad["unparseable"] += 1
                continue
            content = line_breaks(row[3])  # as the consumer reads the same line, whatever its line ending
            yield LogLine(topic=path.name, partition=0, offset=offset, raw=content, template=mask(content),
                          event_time=0.0, label=row[2] == "1", block_ids=block_ids(content), time_source="record")


def count_records(path: Path) -> int:
    """Records in a file as `iter_records` yields them (lines; a last line without newline counts)."""
    count = 0
    last = b"\n"
    with open_binary(path) as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _count_csv_rows(path: Path) -> int:
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding=CSV_ENCODING, newline="") as text:
        return max(0, sum(1 for _ in csv.reader(text)) - 1)


# --- capping ----------------------------------------------------------------------------------


def stratified_counts(anomalous: int, normal: int, cap: int) -> tuple[int, int]:
    """How many anomalous and normal items a cap keeps: the same share, each class kept if present."""
    total = anomalous + normal
    if total <= cap:
        return anomalous, normal
    keep_anomalous = round(cap * anomalous / total)
    if anomalous:
        keep_anomalous = max(keep_anomalous, 1)
    if normal and cap > 1:
        keep_anomalous = min(keep_anomalous, cap - 1)
    keep_anomalous = min(keep_anomalous, anomalous)
    keep_normal = min(cap - keep_anomalous, normal)
    return keep_anomalous, keep_normal


class _Part:
    """Collects one split's windows in stream order; with a cap, a per-class reservoir sample."""

    def __init__(self, cap: int | None, rng: random.Random) -> None:
        self.cap, self.rng = cap, rng
        self.kept: list[tuple[int, LabeledWindow]] = []
        self.reservoirs: dict[bool, list[tuple[int, LabeledWindow]]] = {True: [], False: []}
        self.seen: Counter[bool] = Counter()
        self.lines = 0  # lines fed to this part's windower

    def add(self, item: LabeledWindow) -> None:
        order = self.seen.total()
        self.seen[item.label] += 1
        if self.cap is None:
            self.kept.append((order, item))
            return
        reservoir = self.reservoirs[item.label]
        if len(reservoir) < self.cap:
            reservoir.append((order, item))
        else:
            slot = self.rng.randrange(self.seen[item.label])
            if slot < self.cap:
                reservoir[slot] = (order, item)

    def windows(self) -> list[LabeledWindow]:
        if self.cap is None:
            return [item for _, item in self.kept]
        keep_anomalous, keep_normal = stratified_counts(self.seen[True], self.seen[False], self.cap)
        chosen = self.rng.sample(self.reservoirs[True], keep_anomalous)
        chosen += self.rng.sample(self.reservoirs[False], keep_normal)
        return [item for _, item in sorted(chosen, key=lambda pair: pair[0])]

    def before_cap(self) -> dict[str, int]:
        return {"windows": self.seen.total(), "anomalous": self.seen[True]}


# --- chronological split (BGL, Thunderbird, Liberty) --------------------------------------------


def _chronological_split(
    dataset: str,
    logs: Path,
    rng: random.Random,
    train_fraction: float,
    window_size: int,
    window_stride: int | None,
    max_windows: int | None,
    assume_normal: bool = False,
) -> Split:
    bad: Counter[str] = Counter()
    lines: Iterator[LogLine]  # generators: nothing is read until the loop below
    if is_logllm_csv(logs):
        source, records = "logllm-csv", _count_csv_rows(logs)
        lines = iter_logllm_csv(logs, bad)
    else:
        source, records = FORMATS[dataset], count_records(logs)
        lines = iter_log_lines(logs, LineParser(FORMATS[dataset]), bad=bad)
    boundary = int(records * train_fraction)
    parts = {"train": _Part(max_windows, rng), "test": _Part(max_windows, rng)}
    windowers = {name: make_windower("count", logs.name, 0, size=window_size, stride=window_stride)
                 for name in parts}
    unlabeled = 0
    train_last_time = -math.inf
    test_first_time = math.inf
    inversions = 0

    def accept(name: str, windows: list[Window]) -> None:
        nonlocal unlabeled
        for window in windows:
            label = False if assume_normal else window.label
            if label is None:
                unlabeled += 1
                continue
            parts[name].add(LabeledWindow(window, label))

    for line in lines:
        name = "train" if line.offset < boundary else "test"
        if name == "train":
            train_last_time = max(train_last_time, line.event_time)
        else:
            test_first_time = min(test_first_time, line.event_time)
            inversions += line.event_time < train_last_time
        parts[name].lines += 1
        accept(name, windowers[name].add(line).closed)
    for name, windower in windowers.items():
        accept(name, windower.flush())
    train, test = parts["train"].windows(), parts["test"].windows()
    stats: dict[str, Any] = {
        "source_format": source,
        "split_rule": f"chronological by line: records 0..{boundary - 1} train, {boundary}..{records - 1} test; "
                      "each part windowed separately",
        "window": {"kind": "count", "size": window_size, "stride": window_stride or window_size},
        "lines": {"records": records, "boundary": boundary, "train": parts["train"].lines,
                  "test": parts["test"].lines, "skipped": bad.total()},
        "skipped_lines": dict(bad),
        "skipped_windows": {"unlabeled": unlabeled} if unlabeled else {},
        "train": {**summarize(train), "before_cap": parts["train"].before_cap()},
        "test": {**summarize(test), "before_cap": parts["test"].before_cap()},
        "time": {
            "train_last_event_time": None if train_last_time == -math.inf else train_last_time,
            "test_first_event_time": None if test_first_time == math.inf else test_first_time,
            "test_lines_older_than_train_end": inversions,
        },
    }
    if inversions:
        log.warning("split_time_inversions", test_lines_older_than_train_end=inversions,
                    hint="the file is not in time order; the split follows file order")
    return Split(train, test, stats)


# --- HDFS: random split by block, session windows ------------------------------------------------


def _blocks_in_order(logs: Path) -> tuple[dict[str, None], int]:
    """Every block id the file names, in order of first appearance, and the record count.

    The first of two passes: ids only, no parsing, so choosing the split costs little.
    """
    blocks: dict[str, None] = {}
    records = 0
    for records, record in enumerate(iter_records(logs), start=1):  # noqa: B007  (the count is used below)
        for block in block_ids(record.decode("utf-8", "replace")):
            blocks.setdefault(block, None)
    return blocks, records


def _hdfs_split(
    logs: Path,
    labels_path: Path | None,
    rng: random.Random,
    train_fraction: float,
    max_windows: int | None,
    session_options: dict[str, Any],
) -> Split:
    given = read_block_labels(labels_path) if labels_path is not None else None  # a bad file fails before the scan
    named, records = _blocks_in_order(logs)
    labels = given if given is not None else dict.fromkeys(named, False)  # no label file: all normal
    blocks = sorted(block for block in named if block in labels)
    unlabeled_blocks = len(named) - len(blocks)
    if not blocks:
        raise ValueError(f"none of the {len(named)} block ids in {logs} is in {labels_path or 'the log'}")
    rng.shuffle(blocks)  # sorted first: the assignment depends on the seed and the block set, not file order
    cut = round(len(blocks) * train_fraction)
    train_blocks, test_blocks = set(blocks[:cut]), set(blocks[cut:])
    selected: set[str] | None = None
    if max_windows is not None:
        selected = set()
        for side in (blocks[:cut], blocks[cut:]):
            anomalous = [b for b in side if labels[b]]
            normal = [b for b in side if not labels[b]]
            keep_anomalous, keep_normal = stratified_counts(len(anomalous), len(normal), max_windows)
            selected.update(rng.sample(anomalous, keep_anomalous), rng.sample(normal, keep_normal))

    options = {"gap": HDFS_SESSION_GAP_S, "max_open": HDFS_SESSION_MAX_OPEN}
    options.update({k: v for k, v in session_options.items() if v is not None})
    windower = make_windower("session", logs.name, 0, **options)
    parts = {"train": _Part(max_windows, rng), "test": _Part(max_windows, rng)}
    bad: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    sessions_per_block: Counter[str] = Counter()
    late = parsed = 0

    def accept(windows: list[Window]) -> None:
        for window in windows:
            if window.key not in labels:
                dropped["unlabeled_block"] += 1
                continue
            if selected is not None and window.key not in selected:
                continue
            reasons[window.close_reason] += 1
            sessions_per_block[window.key] += 1
            name = "train" if window.key in train_blocks else "test"
            parts[name].add(LabeledWindow(window, labels[window.key]))

    for line in iter_log_lines(logs, LineParser("hdfs"), bad=bad):
        parsed += 1
        if not line.block_ids:
            bad["unkeyed"] += 1
            continue
        if selected is not None and selected.isdisjoint(line.block_ids):
            continue
        result = windower.add(line)
        if result.future:
            bad["future_timestamp"] += 1
            continue
        late += len(result.late_keys)
        if result.joined == 0:
            bad["late"] += 1
        accept(result.closed)
    accept(windower.flush())
    split_blocks = sum(1 for n in sessions_per_block.values() if n > 1)
    if split_blocks:
        log.warning("hdfs_blocks_in_several_sessions", blocks=split_blocks, gap=options["gap"],
                    hint="a larger session gap (or max_lines/max_open) keeps each block in one window")
    train, test = parts["train"].windows(), parts["test"].windows()
    stats: dict[str, Any] = {
        "source_format": "hdfs",
        "split_rule": f"random by block with the seed: {len(train_blocks)} train blocks, {len(test_blocks)} test "
                      "blocks; session windows by block id",
        "window": {"kind": "session", **options},
        "lines": {"records": records, "parsed": parsed, "skipped": bad.total()},
        "skipped_lines": dict(bad),
        "skipped_windows": dict(dropped),
        "train": {**summarize(train), "before_cap": parts["train"].before_cap()},
        "test": {**summarize(test), "before_cap": parts["test"].before_cap()},
        "sessions": {
            "blocks_named": len(named), "blocks_labeled": len(blocks), "unlabeled_blocks": unlabeled_blocks,
            "train_blocks": len(train_blocks), "test_blocks": len(test_blocks),
            "blocks_in_several_sessions": split_blocks, "late_block_joins": late,
            "close_reasons": dict(reasons),
        },
    }
    return Split(train, test, stats)
