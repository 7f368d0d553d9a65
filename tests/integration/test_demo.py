"""`logstream demo` as the README's first command runs it: shipped LogLLM artifact, embedded models and broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logstream.cli", "demo", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_the_demo_serves_the_shipped_logllm_artifact_and_prints_its_alerts() -> None:
    done = demo("--lines", "300")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "detector: logllm" in done.stderr
    # The second window of BGL_2k (offsets 100-199, a burst of ciod errors) is the one it is sure of.
    assert "offsets 100-199" in done.stdout, (done.stdout[-3000:], done.stderr[-3000:])
    assert "sample holds 3 windows of 100 lines" in done.stderr
    assert "on clean windows" in done.stderr
    assert "Against these labels: precision" in done.stderr and "recall" in done.stderr


def test_the_hdfs_demo_judges_block_sessions_with_the_shipped_hdfs_artifact() -> None:
    """Whole sessions of blocks the artifact never trained on: it must tell them apart, not flag them all."""
    done = demo("--dataset", "hdfs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "detector: logllm, dataset: hdfs" in done.stderr
    assert "The sample holds 100 block sessions, 27 labelled Anomaly" in done.stderr
    found = re.search(r"Against these labels: precision ([0-9]+\.[0-9]+), recall ([0-9]+\.[0-9]+)", done.stderr)
    assert found, done.stderr[-3000:]
    assert float(found.group(1)) > 0.5 and float(found.group(2)) > 0.5, found.group(0)


def test_the_demo_refuses_a_model_it_cannot_load_before_starting_anything() -> None:
    done = demo("--model", "/nonexistent/model")
    assert done.returncode == 2 and "is not a directory" in done.stderr
    done = demo("--detector", "logllama")
    assert done.returncode == 2 and "needs --model" in done.stderr
    done = demo("--detector", "novelty", "--dataset", "hdfs")
    assert done.returncode == 2 and "no shipped novelty model for hdfs" in done.stderr
