"""LogLLM training levers on CPU: what one optimizer step's forward + backward costs, per lever, in one run.

    python bench/fit_levers.py [--windows N] [--rounds R] [--threads T] [--dataset bgl|hdfs]

On the first `--windows` (8) training windows of the shared sample (BGL: 100-line count windows;
HDFS: block sessions with the consumer's HDFS defaults), in micro-batches of 4, it times the
training forward + backward (`LogLLM.loss(...).backward()`, stage 3: everything trainable) under:

  baseline    all 30 SmolLM2 layers, float32, every message in the prompt (the paper's recipe)
  collapse    `--view runs`: a run of identical consecutive messages given once
  bf16        `--bf16`: bfloat16 autocast (CPUs with AMX / AVX512-BF16)
  both        collapse + bf16 (the shipped CPU recipe)
  layers-12   `--llm-layers 12`, float32, every message

The configurations alternate round by round (`--rounds`, 3), so a machine shared with other work
slows all of them alike; each one's best round is compared with the baseline's best round. It also
prints the loss of each configuration on the same windows: a truncated LLM starts far from
answering in the template. And the data side: windows vs distinct windows of the train split, and
message encodings per epoch with and without the frozen-encoder cache. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from logstream.model import LogLLM, model_view, truncate_layers  # noqa: E402
from logstream.settings import Settings  # noqa: E402
from trainer.data import load_split  # noqa: E402
from trainer.distinct import weighted_distinct  # noqa: E402

CONFIGS = ("baseline", "collapse", "bf16", "both", "layers-12")


def load(dataset: str) -> Any:
    if dataset == "bgl":
        return load_split("bgl", SHARED / "BGL" / "BGL_train_sample.log")
    return load_split("hdfs", SHARED / "HDFS" / "HDFS_train_sample.log",
                      SHARED / "HDFS" / "anomaly_label_train_sample.csv")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("bgl", "hdfs"), default="bgl")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = load(args.dataset)
    train = split.train
    windows = [w.window.templates for w in train[: args.windows]]
    labels = [w.label for w in train[: args.windows]]

    torch.manual_seed(0)
    model = LogLLM.build(cache_dir=Settings().cache_dir, device="cpu", seed=0)
    full = torch.nn.ModuleList(list(model.llm.get_decoder().layers))
    model.attach_lora()
    model.set_trainable(projector=True, embedder_lora=True, llm_lora=True)
    model.train()

    def run(config: str) -> tuple[float, float]:
        decoder = model.llm.get_decoder()
        decoder.layers = full
        model.llm.config.num_hidden_layers = len(full)
        if config == "layers-12":
            truncate_layers(model.llm.base_model.model, 12)
        model.view = "runs" if config in ("collapse", "both") else "lines"
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config in ("bf16", "both")
                    else contextlib.nullcontext())
        began, total = time.perf_counter(), 0.0
        for start in range(0, len(windows), 4):
            with autocast:
                loss = model.loss(windows[start : start + 4], labels[start : start + 4])
            loss.backward()
            total += loss.item() * len(windows[start : start + 4])
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - began) / len(windows), total / len(windows)

    run("baseline")  # warm-up
    seconds: dict[str, list[float]] = {c: [] for c in CONFIGS}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for config in CONFIGS:
            per_window, loss = run(config)
            seconds[config].append(per_window)
            losses[config] = loss
    base = min(seconds["baseline"])
    print(f"{args.dataset}: {args.windows} train windows, micro-batches of 4, {args.threads} threads, "
          f"best of {args.rounds} rounds; forward + backward seconds per window")
    for config in CONFIGS:
        best = min(seconds[config])
        print(f"  {config:10s} {best:7.3f} s/window  {base / best:5.2f}x  loss at init {losses[config]:.2f}")

    distinct = weighted_distinct(train, 128, 0.3, view="runs")
    messages = sum(len(w.window.templates) for w in train)
    distinct_messages = len({m for w in train for m in w.window.templates})
    prompt = sum(len(w.window.templates) for w in train) / len(train)
    collapsed = sum(len(model_view(w.window.templates, 128, "runs")) for w in train) / len(train)
    print(f"data: {len(train)} train windows -> {len(distinct)} distinct (collapsed); BERT encodings per epoch "
          f"{messages} -> {distinct_messages} while BERT is frozen; prompt messages per window {prompt:.1f} -> "
          f"{collapsed:.1f} collapsed")
    result = {"dataset": args.dataset, "threads": args.threads, "windows": args.windows,
              "seconds_per_window": {c: round(min(v), 4) for c, v in seconds.items()},
              "speedup": {c: round(base / min(v), 3) for c, v in seconds.items()},
              "loss_at_init": {c: round(v, 3) for c, v in losses.items()},
              "train_windows": len(train), "distinct_windows": len(distinct), "messages_per_epoch": messages,
              "distinct_messages": distinct_messages, "prompt_messages": round(prompt, 2),
              "prompt_messages_collapsed": round(collapsed, 2)}
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
