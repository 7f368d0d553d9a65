"""`logstream-train fit` end to end on the embedded models: every stage, falling losses, kill + resume, serving.

A tiny run of the real recipe on the shipped BGL sample (10-line windows, 10 train windows of which
the latest 2 are the validation share, the rest as distinct weighted windows, micro-batches of 2 with
2 accumulated, one thread), run as a user runs it: the command in a subprocess, its summary on the
last stdout line and its JSON logs on stderr. Its validation share holds no anomalous window, so
the run also shows the documented threshold fallback.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from safetensors.torch import load_file

from logstream.cliargs import command_settings
from logstream.model import ARTIFACT_CONFIG
from tests.kafkatools import (
    SAMPLES,
    create_topic,
    make_settings,
    produce_lines,
    read_alerts,
    run_once,
    unique,
)
from trainer.cli import build_parser
from trainer.fit_logllm import SETTINGS_FLAGS, FitError, fit

REPO = Path(__file__).resolve().parents[2]
BGL = SAMPLES / "BGL_2k.log"
WINDOW = 10
TINY = ["--dataset", "bgl", "--logs", str(BGL), "--window-size", str(WINDOW), "--max-windows", "10",
        "--max-messages", str(WINDOW), "--micro-batch", "2", "--grad-accum", "2", "--probe-windows", "4",
        "--checkpoint-every", "1", "--threads", "1", "--seed", "5"]
STAGES = ("1", "2-1", "2-2", "3")


def fit_command(output: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "fit", *TINY, "--output", str(output), "--cache-dir", str(cache_dir),
            *extra]


def run_fit(output: Path, cache_dir: Path, *extra: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The command to completion: (its summary, its log events)."""
    done = subprocess.run(fit_command(output, cache_dir, *extra), capture_output=True, text=True, timeout=600,
                          cwd=REPO, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return orjson.loads(done.stdout.strip().splitlines()[-1]), events(done.stderr)


def events(stderr: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def checkpoint(output: Path, stage: str) -> dict[str, Any]:
    return torch.load(output / "checkpoints" / f"stage-{stage}.pt", weights_only=True)


FIT_EVENTS: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """All stages and the evaluation, uninterrupted."""
    output = tmp_path_factory.mktemp("logllm-fit") / "model"
    summary, logged = run_fit(output, model_cache_dir)
    FIT_EVENTS[:] = logged
    return output, summary


def test_fit_runs_every_stage_and_writes_the_served_artifact(fitted: tuple[Path, dict[str, Any]]) -> None:
    output, summary = fitted
    config = orjson.loads((output / ARTIFACT_CONFIG).read_bytes())
    assert config["kind"] == "logllm" and config["max_messages"] == WINDOW
    for name in ("projector.safetensors", "embedder_lora/adapter_config.json",
                 "embedder_lora/adapter_model.safetensors", "llm_lora/adapter_config.json",
                 "llm_lora/adapter_model.safetensors", "fit-summary.json",
                 "checkpoints/run.json", "report/report.json", "report/report.md"):
        assert (output / name).is_file(), name
    assert not list(output.glob(".*"))  # no staging or partial directory left behind
    assert list(summary["stages"]) == list(STAGES)
    assert all(checkpoint(output, stage)["done"] for stage in STAGES)
    assert orjson.loads((output / "fit-summary.json").read_bytes())["run_id"] == summary["run_id"]
    evaluation = summary["evaluation"]
    assert evaluation["windows"] == summary["data"]["test"]["windows"] == 10
    assert evaluation["tp"] + evaluation["fp"] + evaluation["fn"] + evaluation["tn"] == 10
    assert set(evaluation["baselines"]) == {"novelty", "count_vector", "tfidf"}
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= evaluation[key] <= 1.0


def test_the_stages_lower_the_loss_on_fixed_training_windows(fitted: tuple[Path, dict[str, Any]]) -> None:
    """Stage 1 (the template) and stage 3 (everything) lower it, and so does the run as a whole; 2-1 and 2-2
    take two optimizer steps each on six distinct windows here, too few to promise a fall on four others."""
    stages, data = fitted[1]["stages"], fitted[1]["data"]
    for stage in ("1", "3"):
        assert stages[stage]["probe_after"] < stages[stage]["probe_before"], (stage, stages[stage])
    assert stages["3"]["probe_after"] < stages["1"]["probe_before"]
    for before, after in itertools.pairwise(STAGES):  # each stage starts from the weights the last one ended with
        assert stages[after]["probe_before"] == stages[before]["probe_after"]
    per_epoch = math.ceil(math.ceil(data["distinct"] / 2) / 2)  # distinct windows, micro-batch 2, accumulation 2
    assert stages["1"]["steps"] == per_epoch and stages["3"]["steps"] == 2 * per_epoch and stages["3"]["epochs"] == 2


def test_training_uses_distinct_weighted_windows_and_holds_out_the_latest_for_validation(
    fitted: tuple[Path, dict[str, Any]],
) -> None:
    data = fitted[1]["data"]
    assert data["train"]["windows"] == 10 and 0 < data["train"]["anomalous"] < 3
    assert data["validation"]["windows"] == 2 and data["fit_train"]["windows"] == 8  # the latest fifth of train
    assert data["distinct"] <= data["fit_train"]["windows"] and data["distinct_anomalous"] >= 1
    assert data["anomalous_weight_share"] == pytest.approx(0.3, abs=1e-3)  # oversampling acts on the weights
    encoded = [i for i, e in enumerate(FIT_EVENTS) if e["event"] == "messages_encoded"]
    done = {e["stage"]: i for i, e in enumerate(FIT_EVENTS) if e["event"] == "stage_done"}
    # BERT is frozen through stages 1 and 2-1: each distinct message encoded once for both; again only
    # after a stage that trained BERT's LoRA (to score the probe and validation windows).
    assert len([i for i in encoded if i < done["2-1"]]) == 1 and len(encoded) == 3


def test_a_validation_share_without_anomalies_falls_back_to_the_documented_threshold(
    fitted: tuple[Path, dict[str, Any]],
) -> None:
    output, summary = fitted
    assert summary["data"]["validation"]["anomalous"] == 0
    decision = orjson.loads((output / ARTIFACT_CONFIG).read_bytes())["decision"]
    assert decision["source"] == "fallback" and decision["threshold"] == 0.5
    assert "no anomalous window" in decision["reason"] and "--validation-fraction" in decision["reason"]
    assert summary["selected"]["stage"] == "3" and summary["selected"]["by"].startswith("last stage")
    warned = [e for e in FIT_EVENTS if e["event"] == "threshold_fallback"]
    assert len(warned) == 1 and warned[0]["reason"] == decision["reason"]


def test_kill_in_stage_three_then_resume_continues_from_the_checkpoint(
    fitted: tuple[Path, dict[str, Any]], tmp_path: Path, model_cache_dir: Path,
) -> None:
    """Stages 1-2 alone, stage 3 SIGKILLed after its first checkpoint, then --resume: the same model as one run."""
    output = tmp_path / "model"
    summary, _ = run_fit(output, model_cache_dir, "--stages", "1,2", "--no-evaluate")
    assert list(summary["stages"]) == ["1", "2-1", "2-2"] and summary["evaluation"] is None
    stage3 = output / "checkpoints" / "stage-3.pt"
    process = subprocess.Popen(fit_command(output, model_cache_dir, "--stages", "3", "--resume", "--no-evaluate"),
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while not stage3.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    killed = checkpoint(output, "3")
    steps = fitted[1]["stages"]["3"]["steps"]
    assert not killed["done"] and 1 <= killed["step"] < steps, killed["step"]

    summary, log = run_fit(output, model_cache_dir, "--resume", "--no-evaluate")
    assert {e["stage"] for e in log if e["event"] == "stage_already_done"} == {"1", "2-1", "2-2"}
    restored = [e for e in log if e["event"] == "checkpoint_restored"]
    assert [(e["stage"], e["step"]) for e in restored] == [("3", killed["step"])]
    progress = [e["step"] for e in log if e["event"] == "stage_progress"]
    assert progress == list(range(killed["step"] + 1, steps + 1))  # continued, not restarted
    final = checkpoint(output, "3")
    assert final["done"] and final["step"] == steps
    assert final["losses"][: len(killed["losses"])] == killed["losses"]
    # Same batches, same dropout noise, same optimizer state: the interrupted run ends where one run ends.
    assert final["losses"] == checkpoint(fitted[0], "3")["losses"]
    ours, reference = load_file(output / "projector.safetensors"), load_file(fitted[0] / "projector.safetensors")
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in reference)
    assert summary["stages"]["3"]["probe_after"] == pytest.approx(fitted[1]["stages"]["3"]["probe_after"], abs=1e-4)


def test_a_resume_with_other_settings_or_nothing_to_resume_is_refused(fitted: tuple[Path, dict[str, Any]],
                                                                      tmp_path: Path, model_cache_dir: Path) -> None:
    def fit_in_process(output: Path, *extra: str) -> None:
        args = build_parser().parse_args(fit_command(output, model_cache_dir, *extra)[3:])
        settings = command_settings(args, SETTINGS_FLAGS, "fit")
        assert settings is not None
        fit(args, settings)

    with pytest.raises(FitError, match="epochs differ"):
        fit_in_process(fitted[0], "--resume", "--epochs-stage3", "3")
    with pytest.raises(FitError, match="nothing to resume"):
        fit_in_process(tmp_path / "none", "--resume")
    with pytest.raises(FitError, match="pass --resume"):
        fit_in_process(fitted[0])


def test_the_fitted_artifact_serves_through_logstream_run(bootstrap: str, fitted: tuple[Path, dict[str, Any]],
                                                          model_cache_dir: Path) -> None:
    topic = unique("logllm-fit")
    create_topic(bootstrap, topic)
    produce_lines(bootstrap, topic, BGL.read_bytes().splitlines()[:100])
    settings = make_settings(bootstrap, topic, format="bgl", window="count", window_size=WINDOW, detector="logllm",
                             model=fitted[0], cache_dir=model_cache_dir, max_messages=WINDOW, emit="all")
    assert run_once(settings) == 0
    alerts = read_alerts(bootstrap, f"{topic}.alerts")
    assert len(alerts) == 10 and {a["detector"]["name"] for a in alerts} == {"logllm"}
    assert sorted(a["source"]["first_offset"] for a in alerts) == list(range(0, 100, WINDOW))
    assert all(0.0 <= a["verdict"]["score"] <= 100.0 for a in alerts)
    assert all((a["verdict"]["score"] >= 50) == (a["verdict"]["label"] == "anomalous") for a in alerts)


def test_two_processes_under_torchrun_train_what_one_process_trains(tmp_path: Path, model_cache_dir: Path) -> None:
    """Stage 2-1 (projector only: no dropout anywhere) on one process and on two under torchrun (gloo on CPU)."""
    one, _ = run_fit(tmp_path / "one", model_cache_dir, "--stages", "2-1", "--no-evaluate")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               "--", *fit_command(tmp_path / "two", model_cache_dir, "--stages", "2-1", "--no-evaluate")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    two = orjson.loads(summaries[0])
    assert one["processes"] == 1 and two["processes"] == 2
    ours, theirs = checkpoint(tmp_path / "two", "2-1"), checkpoint(tmp_path / "one", "2-1")
    assert ours["done"] and len(ours["rng_by_rank"]) == 2 and len(theirs["rng_by_rank"]) == 1
    assert ours["losses"] == pytest.approx(theirs["losses"], abs=1e-4)  # every micro-batch, in order
    two_weights, one_weights = (load_file(tmp_path / name / "projector.safetensors") for name in ("two", "one"))
    assert all(torch.allclose(two_weights[k], one_weights[k], atol=1e-5) for k in one_weights)
    assert two["stages"]["2-1"]["probe_after"] == pytest.approx(one["stages"]["2-1"]["probe_after"], abs=1e-4)


def test_freeze_encoder_trains_stage_three_on_vectors_encoded_once(tmp_path: Path, model_cache_dir: Path) -> None:
    """--freeze-encoder: BERT's LoRA never moves (its B matrices stay at their zero init), the LLM's LoRA
    and the projector learn, and every distinct message is encoded once for the whole run."""
    summary, logged = run_fit(tmp_path / "frozen", model_cache_dir, "--freeze-encoder", "--stages", "1,3",
                              "--epochs-stage3", "1", "--no-evaluate")
    assert list(summary["stages"]) == ["1", "3"]
    assert summary["stages"]["3"]["probe_after"] < summary["stages"]["1"]["probe_before"]
    assert [e["event"] for e in logged].count("messages_encoded") == 1
    weights = checkpoint(tmp_path / "frozen", "3")["weights"]
    embedder_b = [v for k, v in weights.items() if "lora_B" in k and k.startswith("embedder")]
    llm_b = [v for k, v in weights.items() if "lora_B" in k and k.startswith("llm")]
    assert embedder_b and llm_b
    assert all(not v.any() for v in embedder_b)
    assert any(v.any() for v in llm_b)
