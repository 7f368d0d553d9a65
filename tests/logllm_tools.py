"""Test helpers for LogLLM: real windows from the shipped samples, and a tiny artifact trained for a few steps.

A randomly initialised artifact is useless as an oracle check: the base SmolLM2 does not answer in
the template, so the reference-style decoding finds neither word. A few optimizer steps (projector
+ LLM LoRA, the paper's loss) on a handful of real BGL windows teach the template and both labels,
so fast-path and reference verdicts can be compared where it matters, on both classes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from logstream.files import iter_log_lines
from logstream.logs import get_logger
from logstream.model import LogLLM
from logstream.parsing import LineParser
from logstream.records import Window
from logstream.windows import make_windower

SAMPLES = Path(__file__).resolve().parents[1] / "logstream" / "samples"
log = get_logger("tests.logllm")


def file_windows(path: Path, fmt: str, kind: str = "count", size: int = 100) -> list[Window]:
    """Every window of a log file, made by the consumer's own parser and windowing."""
    windower = make_windower(kind, path.name, 0, size=size)
    windows: list[Window] = []
    for line in iter_log_lines(path, LineParser(fmt)):
        windows += windower.add(line).closed
    return windows + windower.flush()


def bgl_windows(size: int = 8) -> tuple[list[Window], list[Window]]:
    """Small count windows of the BGL sample, split by ground truth: (anomalous, normal)."""
    windows = file_windows(SAMPLES / "BGL_2k.log", "bgl", size=size)
    return [w for w in windows if w.label], [w for w in windows if not w.label]


def train_tiny_artifact(directory: Path, cache_dir: Path, *, seed: int = 0, max_steps: int = 60) -> Path:
    """Teach the embedded models the answer template on 8+8 real windows; save the artifact.

    Stops once the loss of the last four steps averages under 0.03, or after `max_steps` (~1 s each on
    an idle core). The loss is a mean over the answer's tokens, of which one decides: at 0.1 that
    token can still be near a coin toss. Below 0.03 the model answers in the template and its
    verdicts follow the training labels.
    """
    anomalous, normal = bgl_windows()
    train = anomalous[:8] + normal[:8]
    torch.manual_seed(seed)
    model = LogLLM.build(cache_dir=cache_dir, seed=seed)
    model.attach_lora()
    model.set_trainable(projector=True, embedder_lora=False, llm_lora=True)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=2e-3)
    rng = random.Random(seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for _ in range(max_steps):
        batch = rng.sample(train, 4)
        loss = model.loss([w.templates for w in batch], [bool(w.label) for w in batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if len(losses) >= 8 and sum(losses[-4:]) / 4 < 0.03:
            break
    recent = sum(losses[-4:]) / 4
    assert recent < 0.1, f"the tiny LogLLM did not learn the answer template in {len(losses)} steps (loss {recent:.3f})"
    model.eval()
    model.save_pretrained(directory)
    log.info("tiny_logllm_trained", steps=len(losses), last_loss=round(losses[-1], 4),
             seconds=round(time.perf_counter() - started, 1))
    return directory
