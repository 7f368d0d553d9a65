"""LogLLaMA log keys: Drain over masked lines, frozen for serving, and a faithful save/load round trip."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from logstream.files import iter_log_lines
from logstream.logkeys import (
    END,
    FIRST_TEMPLATE,
    UNKNOWN,
    DrainOptions,
    KeysError,
    LogKeyMiner,
    LogKeys,
    drain_text,
)
from logstream.parsing import LineParser

SAMPLES = Path(__file__).resolve().parents[2] / "logstream" / "samples"


def sample_templates(name: str, fmt: str) -> list[str]:
    return [line.template for line in iter_log_lines(SAMPLES / name, LineParser(fmt))]


def test_drain_text_makes_variables_one_literal_token() -> None:
    assert drain_text("BLOCK* ask <*> to delete <*> <*> <*>") == "BLOCK* ask <var> to delete <var>"
    assert drain_text("  Receiving block <*> src: <*> dest: <*> ") == "Receiving block <var> src: <var> dest: <var>"
    assert drain_text("") == ""


def test_real_hdfs_lines_give_one_key_per_message_kind() -> None:
    templates = sample_templates("HDFS_2k.log", "hdfs")
    keys = LogKeyMiner().add_all(templates).freeze()
    # 16 masked strings; the three "ask ... to delete <blocks>" lists of different lengths are one key
    assert len(set(templates)) == 16 and keys.templates == 14
    assert keys.size == FIRST_TEMPLATE + 14 and keys.candidates == 15  # END is a candidate too
    assert all(keys.key(t) >= FIRST_TEMPLATE for t in templates)
    deletes = {keys.key(t) for t in templates if t.startswith("BLOCK* ask <*> to delete")}
    assert len(deletes) == 1 and keys.describe(deletes.pop()) == "BLOCK* ask <*> to delete <*>"
    assert keys.describe(UNKNOWN) == "<unknown>" and keys.describe(END) == "<end of session>"


def test_round_trip_through_save_and_load_keeps_every_mapping(tmp_path: Path) -> None:
    templates = sample_templates("BGL_2k.log", "bgl")
    mined = LogKeyMiner(DrainOptions(sim_th=0.6)).add_all(templates[:1500]).freeze()
    mined.save(tmp_path / "keys.json")
    loaded = LogKeys.load(tmp_path / "keys.json")
    assert loaded.options == mined.options and loaded.size == mined.size and loaded.messages == 1500
    # every line, seen in mining or not, maps to the same key, and every key reads the same
    assert [loaded.key(t) for t in templates] == [mined.key(t) for t in templates]
    assert [loaded.describe(k) for k in range(loaded.size)] == [mined.describe(k) for k in range(mined.size)]
    assert loaded.to_json() == mined.to_json()
    assert any(mined.key(t) == UNKNOWN for t in templates[1500:])  # the check covers unseen lines too


def test_frozen_keys_never_learn_while_serving(tmp_path: Path) -> None:
    keys = LogKeyMiner().add_all(["job <*> started", "job <*> finished", "disk <*> ok"]).freeze()
    keys.save(tmp_path / "keys.json")
    served = LogKeys.load(tmp_path / "keys.json")
    before = served.to_json()
    novel = "kernel panic: not syncing <*>"
    assert [served.key(novel) for _ in range(3)] == [UNKNOWN] * 3  # seen three times: still unknown
    assert served.key("job <*> started") == keys.key("job <*> started")
    assert served.to_json() == before  # no cluster created or widened


def test_bad_key_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="not found"):
        LogKeys.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_bytes(orjson.dumps({"format": 99}))
    with pytest.raises(KeysError, match="format 99"):
        LogKeys.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="no messages"):
        LogKeyMiner().freeze()
