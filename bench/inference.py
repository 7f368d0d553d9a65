"""LogLLM inference: the paper's reference-style path vs logstream's fast path, on the same real windows.

    python bench/inference.py [--model DIR] [--datasets BGL,HDFS] [--bgl-windows N] [--hdfs-windows N]
                              [--batch-size B] [--device D]

(a) reference-style: one window at a time, every message re-encoded by BERT, greedy decoding of up
    to 6 tokens, the answer found by searching the text for normal|anomalous (`LogLLM.reference_answer`);
(b) logstream: `LogLLMDetector.score` on batches of `--batch-size` windows, as the scoring thread
    hands them over — embedding and verdict caches (cold at the start), one forward per window.

Both run in this process, on the same weights and the same windows (BGL: 100-line count windows of
the shared BGL training sample, in file order; HDFS: block sessions of the shared HDFS training
sample with the consumer's HDFS defaults, in closing order), after one untimed warm-up window
each. The paths alternate batch by batch (the fast path's caches persist across its batches, as
in a stream), so a machine shared with other work slows both alike and the ratio stays honest.
Prints windows/s of both, the ratio, the cache hit rates, verdict agreement where the reference's
text names a verdict, and the peak memory of each phase (RSS; CUDA allocator peak when on a GPU),
then one JSON line.

Without `--model` the weights are a freshly initialised artifact (seed 0): the speed of both paths
does not depend on the weight values (the reference always decodes its 6 tokens then), but only a
trained artifact makes the agreement figure meaningful.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import torch

from logstream.detectors.logllm import LogLLMDetector
from logstream.files import iter_log_lines
from logstream.logs import configure_logging
from logstream.model import LogLLM
from logstream.parsing import LineParser
from logstream.records import Window
from logstream.settings import Settings
from logstream.windows import make_windower

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "BGL": (SHARED_DATA / "BGL" / "BGL_train_sample.log", "bgl", "count"),
    "HDFS": (SHARED_DATA / "HDFS" / "HDFS_train_sample.log", "hdfs", "session"),
}


def load_windows(path: Path, fmt: str, kind: str, limit: int | None) -> list[Window]:
    """The first `limit` windows of a file, through the consumer's own parsing and windowing."""
    if not path.is_file():
        raise SystemExit(f"benchmark data {path} not found (see ../shared/data/README.md)")
    defaults = Settings(format=fmt)  # the consumer's defaults for this format (HDFS: a one-day session gap)
    windower = make_windower(kind, path.name, 0, size=defaults.window_size, gap=defaults.effective_session_gap,
                             grace=defaults.session_grace, max_lines=defaults.session_max_lines)
    windows: list[Window] = []
    for line in iter_log_lines(path, LineParser(fmt)):
        windows += windower.add(line).closed
        if limit and len(windows) >= limit:
            return windows[:limit]
    windows += windower.flush()
    return windows[:limit] if limit else windows


# --- peak memory per phase ------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Phase:
    """Accumulates the wall time and the peak memory of one path over the segments it runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.peak_rss_mib = 0.0
        self.peak_cuda_mib = 0.0
        self.rss_per_phase = True

    def run(self, work: Callable[[], Any]) -> Any:
        self.rss_per_phase = _reset_peak_rss() and self.rss_per_phase
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = work()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_cuda_mib = max(self.peak_cuda_mib, torch.cuda.max_memory_allocated() / 2**20)
        self.seconds += time.perf_counter() - started
        self.peak_rss_mib = max(self.peak_rss_mib, _peak_rss_mib())
        return result

    def memory(self) -> dict[str, float]:
        memory = {"peak_rss_mib" if self.rss_per_phase else "peak_rss_mib_process": round(self.peak_rss_mib, 1)}
        if self.device.type == "cuda":
            memory["peak_cuda_mib"] = round(self.peak_cuda_mib, 1)
        return memory


# --- the two paths --------------------------------------------------------------------------------


def reference_path(model: LogLLM, windows: list[Window]) -> list[bool | None]:
    with torch.inference_mode():
        return [model.reference_answer(w.templates).anomalous for w in windows]


def ratio(stats: tuple[int, int]) -> float:
    hits, misses = stats
    return round(hits / (hits + misses), 3) if hits + misses else 0.0


def bench_dataset(name: str, windows: list[Window], model: LogLLM, settings: Settings) -> dict[str, Any]:
    def detector() -> LogLLMDetector:
        return LogLLMDetector(model, embedding_cache_size=settings.embedding_cache_size,
                              verdict_cache_size=settings.verdict_cache_size)

    reference_path(model, windows[:1])  # warm-up: thread pools, allocator, lazy inits (untimed)
    detector().score(windows[:1])
    # The two paths alternate batch by batch, so a machine shared with other work slows both alike.
    reference_phase, fast_phase = Phase(model.device), Phase(model.device)
    fast_detector = detector()
    reference: list[bool | None] = []
    fast: list[bool] = []
    for start in range(0, len(windows), settings.batch_size):
        batch = windows[start:start + settings.batch_size]
        reference += reference_phase.run(lambda: reference_path(model, batch))  # noqa: B023 - run at once
        fast += [v.anomalous for v in fast_phase.run(lambda: fast_detector.score(batch))]  # noqa: B023
    ref_seconds, fast_seconds = reference_phase.seconds, fast_phase.seconds
    answered = [(r, f) for r, f in zip(reference, fast) if r is not None]
    return {
        "dataset": name,
        "windows": len(windows),
        "messages": sum(w.size for w in windows),
        "distinct_windows": len({tuple(model.cap(w.templates)) for w in windows}),
        "reference_windows_per_s": round(len(windows) / ref_seconds, 3),
        "fast_windows_per_s": round(len(windows) / fast_seconds, 3),
        "speedup": round(ref_seconds / fast_seconds, 2),
        "reference_seconds": round(ref_seconds, 1),
        "fast_seconds": round(fast_seconds, 1),
        "embedding_cache_hit_rate": ratio(fast_detector.embeddings.stats()),
        "verdict_cache_hit_rate": ratio(fast_detector.verdicts.stats()),
        "messages_encoded_fast": fast_detector.encoded,
        "windows_judged_fast": fast_detector.judged,
        "reference_answers_with_a_verdict": len(answered),
        "agreement_where_answered": round(sum(r == f for r, f in answered) / len(answered), 4) if answered else None,
        "reference_memory": reference_phase.memory(),
        "fast_memory": fast_phase.memory(),
    }


def load_model(args: argparse.Namespace, settings: Settings, scratch: Path) -> tuple[LogLLM, str]:
    """The model both paths share: the given artifact, else a fresh one saved and loaded like a trained one."""
    model_dir = args.model
    weights = f"artifact {args.model}"
    if model_dir is None:
        fresh = LogLLM.build(embedder=settings.embedder, llm=settings.llm, cache_dir=settings.cache_dir,
                             device=settings.device, load_in_4bit=settings.load_in_4bit, seed=0)
        fresh.attach_lora()
        model_dir = scratch / "artifact"
        fresh.save_pretrained(model_dir)
        del fresh
        weights = "freshly initialised artifact (seed 0)"
    detector = LogLLMDetector.from_settings(settings.model_copy(update={"detector": "logllm", "model": model_dir}))
    return detector.model, weights


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="LogLLM artifact (default: a fresh one)")
    parser.add_argument("--bgl-windows", type=int, default=0, help="first N BGL windows (0: all 642)")
    parser.add_argument("--hdfs-windows", type=int, default=300, help="first N HDFS sessions (0: all)")
    parser.add_argument("--datasets", default="BGL,HDFS", help="comma-separated subset of BGL,HDFS")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per score() call (default: settings)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="prepared base models (default: settings)")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    overrides: dict[str, Any] = {"device": args.device}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    settings = Settings().model_copy(update=overrides)
    limits = {"BGL": args.bgl_windows, "HDFS": args.hdfs_windows}
    chosen = [name.strip().upper() for name in args.datasets.split(",") if name.strip()]
    if not chosen or not set(chosen) <= set(DATASETS):
        parser.error(f"--datasets takes a comma-separated subset of {','.join(DATASETS)}")
    with tempfile.TemporaryDirectory(prefix="logstream-bench-") as scratch:
        model, weights = load_model(args, settings, Path(scratch))
        print(f"machine: {machine()}\ndevice: {model.device}  weights: {weights}  batch size: {settings.batch_size}",
              file=sys.stderr)
        results = []
        for name in chosen:
            path, fmt, kind = DATASETS[name]
            windows = load_windows(path, fmt, kind, limits[name] or None)
            result = bench_dataset(name, windows, model, settings)
            results.append(result)
            print(f"{name}: {result['windows']} windows ({result['distinct_windows']} distinct), "
                  f"reference {result['reference_windows_per_s']:.2f} w/s, fast {result['fast_windows_per_s']:.2f} "
                  f"w/s, speedup {result['speedup']:.1f}x; cache hit rates: embedding "
                  f"{result['embedding_cache_hit_rate']:.1%}, verdict {result['verdict_cache_hit_rate']:.1%} "
                  f"(BERT encoded {result['messages_encoded_fast']} of {result['messages']} messages, the LLM "
                  f"judged {result['windows_judged_fast']} windows); "
                  f"peak memory reference {result['reference_memory']}, fast {result['fast_memory']}",
                  file=sys.stderr, flush=True)
    print(orjson.dumps({"machine": machine(), "device": str(model.device), "weights": weights,
                        "batch_size": settings.batch_size, "results": results}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
