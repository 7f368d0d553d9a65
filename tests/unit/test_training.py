"""The fit skeleton every fit command follows, and the run store's one checkpoint naming."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from trainer.fit_logllama import STAGE_TABLE as LOGLLAMA_STAGES
from trainer.fit_logllm import STAGE_TABLE as LOGLLM_STAGES
from trainer.fit_logllm import upgrade_run_config
from trainer.training import SUMMARY_FILE, RunError, RunStore, fit_skeleton


class Recorder:
    def __init__(self) -> None:
        self.summary: dict[str, Any] = {"stages": {}}
        self.calls: list[str] = []

    def prepare(self) -> str:
        self.calls.append("prepare")
        return "data"

    def run(self, stages: Sequence[str], data: str) -> None:
        self.calls.append(f"run {','.join(stages)} on {data}")

    def finish(self, data: str) -> None:
        self.calls.append(f"finish {data}")


def test_the_skeleton_prepares_runs_the_stages_finishes_evaluates_and_writes_the_summary(tmp_path: Path) -> None:
    trainer = Recorder()

    def evaluate(data: str) -> dict[str, Any]:
        trainer.calls.append(f"evaluate {data}")
        return {"f1": 1.0}

    summary = fit_skeleton(trainer, ["1", "2"], tmp_path, evaluate)
    assert trainer.calls == ["prepare", "run 1,2 on data", "finish data", "evaluate data"]
    assert summary["evaluation"] == {"f1": 1.0} and summary["train_seconds"] >= 0
    assert summary["wall_seconds"] >= summary["train_seconds"] and summary["peak_rss_mb"] > 10
    assert orjson.loads((tmp_path / SUMMARY_FILE).read_bytes()) == summary


def test_without_evaluation_no_summary_is_written(tmp_path: Path) -> None:
    """A distributed run's other processes train and finish, but only the main one evaluates and writes."""
    trainer = Recorder()
    summary = fit_skeleton(trainer, ["1"], tmp_path, None)
    assert trainer.calls == ["prepare", "run 1 on data", "finish data"]
    assert "evaluation" not in summary and not (tmp_path / SUMMARY_FILE).exists()


def test_checkpoints_are_named_by_stage_for_every_fit_command(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "checkpoints", RunError)
    store.save("2-1", {"step": 3})
    assert store.path("2-1") == tmp_path / "checkpoints" / "stage-2-1.pt"
    assert store.load("2-1") == {"step": 3} and store.load("3") is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["stage-2-1.pt"]  # no temporary file left


@pytest.mark.parametrize("table", [LOGLLM_STAGES, LOGLLAMA_STAGES])
def test_each_stage_table_names_its_stages_once_with_positive_defaults(table: tuple[Any, ...]) -> None:
    names = [stage.name for stage in table]
    assert len(set(names)) == len(names)
    assert all(stage.lr > 0 and stage.epochs >= 1 and stage.mode and any(stage.trains.values()) for stage in table)


def test_a_run_started_before_a_setting_existed_resumes_with_its_default(tmp_path: Path) -> None:
    from trainer.fit_logllm import FitConfig
    from trainer.training import RUN_FILE

    config = FitConfig(dataset="bgl", logs="x", labels=None, seed=1, train_fraction=0.8, max_windows=None,
                       window={}, embedder=None, llm=None, max_messages=128, load_in_4bit=False,
                       gradient_checkpointing=False, beta=0.3, micro_batch=4, grad_accum=4, lr={}, epochs={},
                       stage1_samples=1000, lr_gamma=0.7, lr_decay_every=None, probe_windows=16)
    store = RunStore(tmp_path / "checkpoints")
    run_id = store.begin(config, resume=False)
    run_file = tmp_path / "checkpoints" / RUN_FILE
    saved = orjson.loads(run_file.read_bytes())
    for newer in ("freeze_encoder", "view", "bf16"):  # run.json of a run older than these settings
        del saved["config"][newer]
    run_file.write_bytes(orjson.dumps(saved))
    assert store.begin(config, resume=True) == run_id  # every newer setting at its default
    saved["config"]["collapse_repeats"] = True  # a run from before --view, with the flag that became runs
    run_file.write_bytes(orjson.dumps(saved))
    with pytest.raises(RunError, match=": collapse_repeats differ"):
        store.begin(config, resume=True)
    assert store.begin(dataclasses.replace(config, view="runs"), resume=True, upgrade=upgrade_run_config) == run_id
    del saved["config"]["collapse_repeats"]
    run_file.write_bytes(orjson.dumps(saved))
    with pytest.raises(RunError, match=": freeze_encoder differ"):
        store.begin(dataclasses.replace(config, freeze_encoder=True), resume=True)
    del saved["config"]["logs"]  # a field without a default missing from run.json is still a difference
    run_file.write_bytes(orjson.dumps(saved))
    with pytest.raises(RunError, match=": logs differ"):
        store.begin(config, resume=True)
