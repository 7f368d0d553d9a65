"""Evidence for LogLLM verdicts: hit rate and cost of each attribution method, measured in one run.

For every true-positive window (labelled anomalous, judged anomalous) of a BGL-format dump's split,
each method of `logstream.attribution` ranks the window's distinct masked messages; a method *hits*
when its top-3 evidence lines include an alert-tagged line (BGL's first field is not `-`). Beside
them: the exact expected hit rate of 3 lines drawn at random from the window (the floor) and of 3
distinct messages drawn at random. Cost: seconds per attributed window, and the ratio to the
window's own scoring time (the same window judged alone by the detector, embeddings cached),
both measured here, interleaved window by window.

    python bench/attribution.py --logs ../shared/data/BGL/BGL_train_sample.log --part test
    python bench/attribution.py --logs ... --part all --methods occlusion gradient

Prints one table per split part and, as the last stdout line, the JSON of all figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from logstream.attribution import EVIDENCE_METHODS, Attributor, first_seen_line, localize, ranking_evidence
from logstream.detectors.logllm import LogLLMDetector
from logstream.settings import Settings
from trainer.data import load_split

SHIPPED = Path(__file__).resolve().parent.parent / "logstream" / "samples" / "logllm-bgl"


def random_lines_hit(tagged: int, lines: int, k: int = 3) -> float:
    """P(at least one of k lines drawn without replacement from `lines` is among the `tagged`)."""
    if lines - tagged < k:
        return 1.0
    return 1.0 - math.comb(lines - tagged, k) / math.comb(lines, k)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, required=True, help="BGL-format log dump with alert tags")
    parser.add_argument("--model", type=Path, default=SHIPPED, help="LogLLM artifact (default: the shipped BGL one)")
    parser.add_argument("--part", choices=("test", "train", "all"), default="test")
    parser.add_argument("--methods", nargs="+", choices=EVIDENCE_METHODS, default=list(EVIDENCE_METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = load_split("bgl", args.logs)
    windows = split.part(args.part)
    detector = LogLLMDetector.from_settings(Settings(detector="logllm", model=args.model, logllm_evidence="off"))
    model = detector.model
    started = time.perf_counter()
    verdicts = []
    for i in range(0, len(windows), 16):
        verdicts += detector.score([item.window for item in windows[i:i + 16]])
    print(f"scored {len(windows)} windows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    positives = [item.window for item, v in zip(windows, verdicts) if item.label and v.anomalous]

    attributors = {method: Attributor(model, method) for method in args.methods}
    rows: list[dict[str, Any]] = []
    for window in positives:
        capped = model.cap(window.templates)
        seen_from = first_seen_line(window.templates, model.max_messages, model.view)
        vectors = detector._message_vectors(dict.fromkeys(capped))
        began = time.perf_counter()
        [p] = detector._probabilities([capped], vectors)
        own = time.perf_counter() - began
        tagged_lines = {i for i in range(seen_from, window.size) if window.lines[i].label}
        lines_seen = window.size - seen_from
        distinct = list(dict.fromkeys(capped))
        tagged_messages = {window.lines[i].template for i in tagged_lines}
        row: dict[str, Any] = {
            "distinct": len(distinct), "own_s": own, "p": p,
            "random_lines": random_lines_hit(len(tagged_lines), lines_seen),
            "random_messages": random_lines_hit(len(tagged_messages & set(distinct)), len(distinct)),
        }
        for method, attributor in attributors.items():
            attribution = attributor.attribute(capped, vectors, p,
                                               lambda ws, vectors=vectors: detector._probabilities(ws, vectors))
            evidence = localize(window, seen_from, ranking_evidence(attribution))
            top = [item["line"] for item in evidence[:3]]
            unfiltered = localize(window, seen_from, [
                {"template": m, "contribution": c, "method": method} for m, c in attribution.ranking[:3]])
            row[method] = {"hit": any(i in tagged_lines for i in top),
                           "hit_top3_any_sign": any(item["line"] in tagged_lines for item in unfiltered),
                           "first": bool(top) and top[0] in tagged_lines,
                           "seconds": attribution.seconds, "rows": attribution.rows}
        rows.append(row)

    summary = summarize(rows, args.methods)
    summary.update(part=args.part, windows=len(windows), model=str(args.model))
    print_table(summary, args.methods)
    print(orjson.dumps(summary).decode())
    return 0


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    def mean(values: list[float]) -> float | None:
        return round(statistics.fmean(values), 4) if values else None

    hard = [r for r in rows if r["distinct"] > 3]
    out: dict[str, Any] = {
        "true_positives": len(rows), "with_more_than_3_messages": len(hard),
        "own_scoring_s": mean([r["own_s"] for r in rows]),
        "floor_random_lines": {"all": mean([r["random_lines"] for r in rows]),
                               "hard": mean([r["random_lines"] for r in hard])},
        "floor_random_messages": {"all": mean([r["random_messages"] for r in rows]),
                                  "hard": mean([r["random_messages"] for r in hard])},
        "methods": {},
    }
    for method in methods:
        attributed = [r for r in rows if r[method]["rows"] > 0]
        out["methods"][method] = {
            "hit_rate": {"all": mean([float(r[method]["hit"]) for r in rows]),
                         "hard": mean([float(r[method]["hit"]) for r in hard])},
            "hit_rate_any_sign": {"all": mean([float(r[method]["hit_top3_any_sign"]) for r in rows]),
                                  "hard": mean([float(r[method]["hit_top3_any_sign"]) for r in hard])},
            "first_line_tagged": {"all": mean([float(r[method]["first"]) for r in rows]),
                                  "hard": mean([float(r[method]["first"]) for r in hard])},
            "seconds_per_window": mean([r[method]["seconds"] for r in attributed]),
            "ratio_to_own_scoring": mean([r[method]["seconds"] / r["own_s"] for r in attributed]),
            "rows_per_window": mean([float(r[method]["rows"]) for r in attributed]),
        }
    return out


def print_table(summary: dict[str, Any], methods: list[str]) -> None:
    print(f"\n{summary['true_positives']} true positives ({summary['with_more_than_3_messages']} with > 3 distinct "
          f"messages); own scoring {summary['own_scoring_s']} s per window")
    print("| method | top-3 hit (all / >3 msgs) | first line tagged | s per window | x own scoring | rows |")
    print("|---|---|---|---:|---:|---:|")
    for method in methods:
        m = summary["methods"][method]
        print(f"| {method} | {m['hit_rate']['all']} / {m['hit_rate']['hard']} | {m['first_line_tagged']['all']} / "
              f"{m['first_line_tagged']['hard']} | {m['seconds_per_window']} | {m['ratio_to_own_scoring']} | "
              f"{m['rows_per_window']} |")
    for floor in ("floor_random_lines", "floor_random_messages"):
        print(f"| {floor} | {summary[floor]['all']} / {summary[floor]['hard']} | | | | |")


if __name__ == "__main__":
    sys.exit(main())
