"""The trainer's splits (no time leakage, reproducible HDFS split by block), caps and minority oversampling."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from logstream.records import LogLine, Window
from trainer.data import (
    LabeledWindow,
    load_split,
    minority_target,
    oversample,
    stratified_counts,
    verbatim_overlap,
)

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"


def bgl_line(second: int, anomalous: bool = False, text: str | None = None) -> str:
    tag = "KERNDTLB" if anomalous else "-"
    content = text or f"generating core.{second}"
    return (f"{tag} {1117838570 + second} 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.363779 "
            f"R02-M1-N0-C:J12-U11 RAS KERNEL INFO {content}")


def write_bgl(path: Path, n: int, anomalous_every: int = 37) -> Path:
    lines = [bgl_line(i, anomalous=i % anomalous_every == 5) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def offsets(windows: list[LabeledWindow]) -> list[int]:
    return [line.offset for item in windows for line in item.window.lines]


# --- chronological split ----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "size", "stride"), [(1000, 100, None), (1050, 100, None), (1000, 100, 30), (333, 7, 7)])
def test_chronological_split_has_no_time_leakage(tmp_path: Path, n: int, size: int, stride: int | None) -> None:
    path = write_bgl(tmp_path / "bgl.log", n)
    split = load_split("bgl", path, window_size=size, window_stride=stride)
    boundary = int(n * 0.8)
    train, test = offsets(split.train), offsets(split.test)
    assert max(train) < boundary <= min(test)  # no window straddles the boundary
    assert max(line.event_time for item in split.train for line in item.window.lines) <= min(
        line.event_time for item in split.test for line in item.window.lines)
    assert set(train) == set(range(boundary)) and set(test) == set(range(boundary, n))  # nothing lost
    assert split.stats["lines"] == {"records": n, "boundary": boundary, "train": boundary, "test": n - boundary,
                                    "skipped": 0}
    assert split.stats["time"]["test_lines_older_than_train_end"] == 0
    for item in split.train + split.test:
        assert item.label == any(line.label for line in item.window.lines)
    if stride is None:
        assert len(split.train) == -(-boundary // size) and len(split.test) == -(-(n - boundary) // size)


def test_chronological_split_of_the_packaged_bgl_sample() -> None:
    split = load_split("bgl", SAMPLES / "BGL_2k.log")
    assert [len(split.train), len(split.test)] == [16, 4]
    assert split.stats["train"]["anomalous"] + split.stats["test"]["anomalous"] == 12  # shared/data/README.md
    last_train = max(line.event_time for item in split.train for line in item.window.lines)
    assert all(line.event_time >= last_train for item in split.test for line in item.window.lines)


def test_gzip_dump_gives_the_same_windows(tmp_path: Path) -> None:
    plain = write_bgl(tmp_path / "bgl.log", 500)
    packed = tmp_path / "bgl.log.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a, b = load_split("bgl", plain), load_split("bgl", packed)
    assert [w.window.templates for w in a.test] == [w.window.templates for w in b.test]
    assert [w.label for w in a.train] == [w.label for w in b.train]


def test_bad_lines_are_counted_by_reason_not_windowed(tmp_path: Path) -> None:
    lines = [bgl_line(i) for i in range(200)]
    lines[10] = "garbage"
    lines[150] = ""
    path = tmp_path / "bgl.log"
    path.write_text("\n".join(lines) + "\n")
    split = load_split("bgl", path)
    assert split.stats["skipped_lines"] == {"unparseable": 1, "empty": 1}
    assert 10 not in offsets(split.train) and 150 not in offsets(split.test)
    assert split.stats["lines"]["records"] == 200


def test_verbatim_overlap_counts_repeated_message_sequences(tmp_path: Path) -> None:
    # the same 10 messages over and over: every test window repeats a train window
    lines = [bgl_line(i, text=f"message number{i % 10}" if i % 10 else "message zero") for i in range(400)]
    path = tmp_path / "bgl.log"
    path.write_text("\n".join(lines))
    split = load_split("bgl", path, window_size=10)
    assert split.stats["overlap"] == {"test_windows_in_train": 8, "anomalous": 0, "normal": 8, "label_conflicts": 0}


def test_overlap_reports_label_conflicts() -> None:
    def window(first: int, templates: list[str]) -> Window:
        return Window("count", "t/0", "t", 0, [LogLine("t", 0, first + i, t, t, 0.0) for i, t in enumerate(templates)],
                      "size")

    train = [LabeledWindow(window(0, ["a", "b"]), False), LabeledWindow(window(2, ["c"]), True)]
    test = [LabeledWindow(window(3, ["a", "b"]), True), LabeledWindow(window(5, ["b", "a"]), False),
            LabeledWindow(window(7, ["c"]), True)]
    assert verbatim_overlap(train, test) == {"test_windows_in_train": 2, "anomalous": 2, "normal": 0,
                                             "label_conflicts": 1}


def test_logllm_liberty_csv(tmp_path: Path) -> None:
    rows = ["line_no,window,label,content"]
    for i in range(1, 201):
        anomalous = i in (42, 190)
        content = ('"pbs_mom: task_check, cannot tm_reply to 12345.node"' if anomalous
                   else f'"ntpd[{i}]: kernel, ""time"""')
        rows.append(f"{i},{(i - 1) // 100 + 1},{int(anomalous)},{content}")
    rows.append("201,3,1,unquoted, comma")  # one column too many: a bad row, counted
    path = tmp_path / "liberty.csv"
    path.write_text("\n".join(rows) + "\n")
    split = load_split("liberty", path)
    assert split.stats["source_format"] == "logllm-csv"
    assert split.stats["skipped_lines"] == {"unparseable": 1}
    assert [(len(w.window.lines), w.label) for w in split.train] == [(100, True), (60, False)]
    assert [(len(w.window.lines), w.label) for w in split.test] == [(40, True)]
    assert split.train[0].window.lines[0].template == '<*> kernel, "time"'
    assert split.train[0].window.lines[41].template == "pbs_mom: task_check, cannot tm_reply to <*>"


# --- HDFS ---------------------------------------------------------------------------------------


HDFS_LOG = SAMPLES / "HDFS_2k.log"
HDFS_LABELS = SAMPLES / "anomaly_label_HDFS_2k.csv"


def test_hdfs_split_by_block_is_reproducible_and_disjoint() -> None:
    first = load_split("hdfs", HDFS_LOG, HDFS_LABELS, seed=7)
    again = load_split("hdfs", HDFS_LOG, HDFS_LABELS, seed=7)
    other = load_split("hdfs", HDFS_LOG, HDFS_LABELS, seed=8)
    def keys(part: list[LabeledWindow]) -> list[str]:
        return [w.window.key for w in part]

    assert keys(first.train) == keys(again.train) and keys(first.test) == keys(again.test)
    assert set(keys(first.test)) != set(keys(other.test))
    assert not set(keys(first.train)) & set(keys(first.test))
    assert len(set(keys(first.train)) | set(keys(first.test))) == 2200  # every labelled block, once
    assert len(first.train) == 1760 and len(first.test) == 440
    assert sum(w.label for w in first.train + first.test) == 69  # anomalous blocks (shared/data/README.md)


def hdfs_line(hhmmss: str, text: str) -> str:
    return f"081109 {hhmmss} 143 INFO dfs.DataNode$PacketResponder: {text}"


def test_hdfs_line_naming_several_blocks_joins_each_and_default_gap_keeps_blocks_whole(tmp_path: Path) -> None:
    log = tmp_path / "hdfs.log"
    log.write_text("\n".join([
        hdfs_line("010000", "Receiving block blk_1 src: /10.0.0.1:5000"),
        hdfs_line("010001", "Receiving block blk_-2 src: /10.0.0.1:5000"),
        hdfs_line("010002", "BLOCK* ask 10.0.0.1:50010 to delete blk_1 blk_-2"),
        hdfs_line("030000", "Deleting block blk_1 file /tmp/x"),  # two hours later: still blk_1's session
        hdfs_line("030001", "no block here"),
    ]) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("BlockId,Label\nblk_1,Anomaly\nblk_-2,Normal\n")
    split = load_split("hdfs", log, labels, train_fraction=0.5)
    windows = {w.window.key: w for w in split.train + split.test}
    assert [line.offset for line in windows["blk_1"].window.lines] == [0, 2, 3]
    assert [line.offset for line in windows["blk_-2"].window.lines] == [1, 2]
    assert windows["blk_1"].label is True and windows["blk_-2"].label is False
    assert split.stats["skipped_lines"] == {"unkeyed": 1}
    assert split.stats["sessions"]["blocks_in_several_sessions"] == 0

    short = load_split("hdfs", log, labels, train_fraction=0.5, gap=300.0)
    sessions = [w for w in short.train + short.test if w.window.key == "blk_1"]
    assert len(sessions) == 2 and short.stats["sessions"]["blocks_in_several_sessions"] == 1
    # every session of a block lands on the same side of the split
    assert len({id(part) for part in (short.train, short.test) for w in part if w.window.key == "blk_1"}) == 1


def test_hdfs_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label file"):
        load_split("hdfs", HDFS_LOG)
    bad = tmp_path / "labels.csv"
    bad.write_text("BlockId,Label\nblk_1,Maybe\n")
    with pytest.raises(ValueError, match="Normal|Anomaly"):
        load_split("hdfs", HDFS_LOG, bad)
    with pytest.raises(ValueError, match="own labels"):
        load_split("bgl", SAMPLES / "BGL_2k.log", HDFS_LABELS)
    with pytest.raises(ValueError, match="session options"):
        load_split("bgl", SAMPLES / "BGL_2k.log", gap=10.0)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("spirit", SAMPLES / "BGL_2k.log")
    with pytest.raises(FileNotFoundError):
        load_split("bgl", tmp_path / "missing.log")


# --- caps ---------------------------------------------------------------------------------------


def test_max_windows_caps_each_split_keeping_anomalies_and_order(tmp_path: Path) -> None:
    path = write_bgl(tmp_path / "bgl.log", 5000, anomalous_every=997)  # few anomalous windows
    full = load_split("bgl", path, window_size=10)
    capped = load_split("bgl", path, window_size=10, max_windows=30)
    again = load_split("bgl", path, window_size=10, max_windows=30)
    for part in ("train", "test"):
        windows = capped.part(part)
        assert len(windows) == 30
        assert any(w.label for w in windows) and not all(w.label for w in windows)
        firsts = [w.window.first_offset for w in windows]
        assert firsts == sorted(firsts)
        assert [w.window.window_id for w in windows] == [w.window.window_id for w in again.part(part)]
        assert capped.stats[part]["before_cap"] == {"windows": len(full.part(part)),
                                                    "anomalous": sum(w.label for w in full.part(part))}
    hdfs = load_split("hdfs", HDFS_LOG, HDFS_LABELS, max_windows=50)
    assert len(hdfs.train) == len(hdfs.test) == 50
    assert any(w.label for w in hdfs.test) and any(w.label for w in hdfs.train)


@pytest.mark.parametrize(("anomalous", "normal", "cap", "expected"), [
    (10, 90, 200, (10, 90)),
    (10, 90, 50, (5, 45)),
    (1, 999, 10, (1, 9)),
    (999, 1, 10, (9, 1)),
    (0, 100, 10, (0, 10)),
    (5, 5, 1, (1, 0)),
])
def test_stratified_counts(anomalous: int, normal: int, cap: int, expected: tuple[int, int]) -> None:
    assert stratified_counts(anomalous, normal, cap) == expected


# --- oversampling -------------------------------------------------------------------------------


def labelled(n_anomalous: int, n_normal: int) -> list[LabeledWindow]:
    def window(i: int) -> Window:
        return Window("count", "t/0", "t", 0, [LogLine("t", 0, i, "x", "x", 0.0)], "size")

    return [LabeledWindow(window(i), i < n_anomalous) for i in range(n_anomalous + n_normal)]


@pytest.mark.parametrize(("anomalous", "normal", "minority_is_anomalous"), [
    (3, 97, True), (10, 1000, True), (850, 150, False), (1, 6, True),
])
def test_oversample_reaches_beta_for_the_minority_class(anomalous: int, normal: int,
                                                        minority_is_anomalous: bool) -> None:
    windows = labelled(anomalous, normal)
    result = oversample(windows, beta=0.3, seed=1)
    minority = [w for w in result if w.label == minority_is_anomalous]
    majority = [w for w in result if w.label != minority_is_anomalous]
    assert len(majority) == max(anomalous, normal)  # the majority is never touched
    assert len(minority) / len(result) >= 0.3
    assert (len(minority) - 1) / (len(result) - 1) < 0.3  # the smallest count that reaches beta
    originals = [w for w in windows if w.label == minority_is_anomalous]
    repeats = [sum(1 for m in minority if m is o) for o in originals]
    assert max(repeats) - min(repeats) <= 1  # copies spread evenly over the minority
    assert oversample(windows, beta=0.3, seed=1) == result  # seeded


def test_oversample_leaves_balanced_or_single_class_data_alone() -> None:
    balanced = labelled(40, 60)
    assert sorted(id(w) for w in oversample(balanced)) == sorted(id(w) for w in balanced)
    only_normal = labelled(0, 20)
    assert len(oversample(only_normal)) == 20
    with pytest.raises(ValueError):
        oversample(balanced, beta=0.7)


def test_minority_target_is_exact() -> None:
    for majority in range(1, 400):
        target = minority_target(majority, 0.3)
        assert target / (target + majority) >= 0.3 > (target - 1) / (target - 1 + majority)
