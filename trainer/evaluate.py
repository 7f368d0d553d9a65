"""`logstream-train evaluate`: judge a split's windows as the consumer would, beside two cheap baselines.

The model is loaded through the consumer's detector registry (`load_detector`) from its artifact
and scored through the same `Detector.score` interface in batches, so the numbers describe what
`logstream run --detector KIND --model DIR` will do on that traffic. The unseen-template detector
and a count-vector classifier, both fitted on the train split only, are scored on the same windows,
so a reader sees at once whether the model earns its cost.

Output: `report.json`, `report.md` with PNG plots and `predictions.jsonl` in `--report DIR`, and one
JSON object as the last line on stdout (logs go to stderr).

Reuse from training code: `evaluate(split, outdir, detector=...)` does all of it for a detector
object already in memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from logstream.detectors.base import Detector, DetectorNotReady
from logstream.logs import get_logger
from logstream.settings import Settings
from logstream.windows import window_options
from trainer.baselines import CountVectorDetector, TfidfDetector, fit_novelty
from trainer.data import (
    DATASETS,
    FORMATS,
    HDFS_SESSION_GAP_S,
    HDFS_SESSION_MAX_OPEN,
    SESSION_OPTIONS,
    LabeledWindow,
    Split,
    load_split,
)
from trainer.evidence import evidence_account
from trainer.report import DetectorRun, headline, write_report

log = get_logger(__name__)

BASELINES_ONLY = "novelty"
# JSON "kind" of an artifact -> the registry name of the detector that serves it
ARTIFACT_DETECTORS = {"logllm": "logllm", "logllama": "logllama", "logstream.novelty": "novelty"}
# Settings fields the command exposes as flags (the same flags and LOGSTREAM_* variables as `logstream run`)
SETTINGS_FLAGS = (
    "batch_size", "window_size", "window_stride", "session_gap", "session_grace", "session_max_lines",
    "session_max_open", "device", "embedder", "llm", "cache_dir", "load_in_4bit", "max_messages",
    "embedding_cache_size", "verdict_cache_size", "logllm_evidence", "log_level",
)
_ARTIFACT_JSON_MAX_BYTES = 1 << 20


# --- scoring ----------------------------------------------------------------------------------


def score_windows(
    detector: Detector,
    windows: Sequence[LabeledWindow],
    *,
    batch_size: int = 16,
    name: str | None = None,
    role: str = "model",
    progress: bool = True,
) -> DetectorRun:
    """Verdicts of `detector` on `windows`, `batch_size` windows per `score` call (as the consumer batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from tqdm import tqdm

    run = DetectorRun(name=name or detector.name, role=role, version=str(getattr(detector, "version", "")))
    bar = tqdm(total=len(windows), desc=run.name, unit="window", file=sys.stderr, disable=None if progress else True)
    evidence_before = evidence_account(detector)
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            began = time.perf_counter()
            verdicts = detector.score([item.window for item in batch])
            run.seconds += time.perf_counter() - began
            if len(verdicts) != len(batch):
                raise RuntimeError(f"detector {run.name} returned {len(verdicts)} verdicts for {len(batch)} windows")
            for item, verdict in zip(batch, verdicts):
                run.labels.append(item.label)
                run.predicted.append(bool(verdict.anomalous))
                run.scores.append(float(verdict.score))
                if item.label and verdict.anomalous:
                    run.evidence.add(item.window, verdict)
            bar.update(len(batch))
    finally:
        bar.close()
        run.evidence.cost(detector, evidence_before)
    return run


def run_baselines(
    train: Sequence[LabeledWindow],
    windows: Sequence[LabeledWindow],
    *,
    batch_size: int = 256,
    seed: int = 42,
) -> list[DetectorRun]:
    """The unseen-template detector, the count-vector and the TF-IDF classifiers, fitted on `train`, scored on
    `windows`.

    A baseline that cannot be fitted (e.g. a train split with one class for the classifier) comes
    back with `skipped` set to the reason instead of failing the evaluation.
    """
    runs = []
    fits = (("novelty", fit_novelty), ("count_vector", lambda t: CountVectorDetector.fit(t, seed=seed)),
            ("tfidf", lambda t: TfidfDetector.fit(t, seed=seed)))
    for name, fit in fits:
        began = time.perf_counter()
        try:
            detector = fit(train)
        except ValueError as exc:
            log.warning("baseline_skipped", baseline=name, reason=str(exc))
            runs.append(DetectorRun(name=name, role="baseline", skipped=str(exc)))
            continue
        fit_seconds = time.perf_counter() - began
        run = score_windows(detector, windows, batch_size=batch_size, name=name, role="baseline", progress=False)
        run.fit_seconds = fit_seconds
        runs.append(run)
    return runs


ASSUMED_NORMAL_NOTE = (
    "Every window was assumed normal (--assume-normal: no labels): each window a detector flags counts as a "
    "false positive, so FP / windows is its alarm rate on this traffic; precision and recall are undefined."
)


def evaluate(
    split: Split,
    outdir: Path,
    *,
    detector: Detector | None = None,
    model: str = BASELINES_ONLY,
    part: str = "test",
    batch_size: int = 16,
    seed: int = 42,
    progress: bool = True,
    context: dict[str, Any] | None = None,
    compare: Mapping[str, Detector] | None = None,
) -> dict[str, Any]:
    """Score `split.part(part)` with `detector` and the baselines, write the report, return the summary.

    With `detector=None` the unseen-template baseline is the primary detector (`--model novelty`).
    The summary is what the command prints as its last line: the primary detector's precision,
    recall, f1, tp, fp, fn, tn, windows, anomalous_windows and seconds (its scoring time), plus
    the baselines' P/R/F1 and the verbatim train/test overlap. `compare` scores more detectors on the
    same windows, by display name (e.g. a model before its last training stage); their P/R/F1 go
    into the summary's `compared` and beside the primary in the report.
    """
    windows = split.part(part)
    if not windows:
        raise ValueError(f"the {part} split has no windows to evaluate")
    if compare and detector is None:
        raise ValueError("detectors to compare need a primary detector to compare with")
    runs: list[DetectorRun] = []
    if detector is not None:
        baseline_name = detector.name in ("novelty", "count_vector", "tfidf")
        name = f"{detector.name} (model)" if baseline_name else detector.name
        log.info("scoring", detector=name, windows=len(windows), batch_size=batch_size)
        runs.append(score_windows(detector, windows, batch_size=batch_size, name=name, progress=progress))
    for label, other in (compare or {}).items():
        runs.append(score_windows(other, windows, batch_size=batch_size, name=label, role="compared",
                                  progress=progress))
    runs.extend(run_baselines(split.train, windows, seed=seed))
    primary = next((run for run in runs if run.skipped is None), None)
    if primary is None:
        raise ValueError("no detector could be evaluated: " + "; ".join(f"{r.name}: {r.skipped}" for r in runs))
    entry = primary.as_dict()
    summary: dict[str, Any] = {
        "detector": primary.name,
        "model": model,
        "dataset": split.stats.get("dataset"),
        "split": part,
        **{key: entry[key] for key in ("precision", "recall", "f1", "tp", "fp", "fn", "tn", "windows",
                                       "anomalous_windows")},
        "seconds": entry["seconds"],
        "undefined": entry["undefined"],
        "average_precision": entry["average_precision"],
        "test_windows_in_train": split.stats.get("overlap", {}).get("test_windows_in_train"),
        "baselines": {
            run.name: ({"skipped": run.skipped} if run.skipped is not None else
                       {key: run.as_dict()[key] for key in ("precision", "recall", "f1")})
            for run in runs if run.role == "baseline"
        },
        "report": str(outdir / "report.md"),
    }
    # evidence hit rate on true positives with line labels (BGL), for each detector that names lines
    evidence = {run.name: run.evidence.as_dict() for run in runs if run.skipped is None and run.evidence.windows
                and (run.evidence.without_evidence < run.evidence.windows or run.role != "baseline")}
    if evidence:
        summary["evidence"] = evidence
    if compare:
        summary["compared"] = {run.name: {key: run.as_dict()[key] for key in ("precision", "recall", "f1")}
                               for run in runs if run.role == "compared"}
    notes = []
    if (context or {}).get("assume_normal"):
        notes.append(ASSUMED_NORMAL_NOTE)
    if part == "all":
        notes.append("Evaluated on train and test windows together: the baselines were fitted on the train part, so "
                     "their scores are partly in-sample (and so is a model trained on this dump's train part).")
    note = " ".join(notes) or None
    write_report(outdir, runs, windows, summary=summary, data=split.stats,
                 context={"model": model, "part": part, "batch_size": batch_size, "note": note, **(context or {})})
    log.info("evaluated", **{k: summary[k] for k in ("detector", "precision", "recall", "f1", "windows")},
             report=summary["report"])
    return summary


# --- artifacts --------------------------------------------------------------------------------


def artifact_kind(path: Path) -> str:
    """Which detector serves an artifact: the `kind` of its JSON config (a file, or a JSON file in the directory)."""
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.glob("*.json") if p.stat().st_size <= _ARTIFACT_JSON_MAX_BYTES)
    else:
        raise DetectorNotReady(f"model {path} not found (give an artifact directory, a novelty model file, or "
                               f"`{BASELINES_ONLY}` for the baselines only)")
    kinds: dict[str, Path] = {}
    for candidate in candidates:
        try:
            body = orjson.loads(candidate.read_bytes())
        except orjson.JSONDecodeError:
            continue
        if isinstance(body, dict) and body.get("kind") in ARTIFACT_DETECTORS:
            kinds.setdefault(body["kind"], candidate)
    if len(kinds) != 1:
        found = ", ".join(f"{k} ({p.name})" for k, p in kinds.items()) or "none"
        raise DetectorNotReady(f"{path}: expected one JSON config with a `kind` of {', '.join(ARTIFACT_DETECTORS)}; "
                               f"found {found}")
    return ARTIFACT_DETECTORS[next(iter(kinds))]


def load_model(path: Path, settings: Settings, dataset: str) -> Detector:
    """The artifact's detector, built by the consumer's registry with `settings` (device, caches, batch)."""
    from logstream.detectors.registry import load_detector

    kind = artifact_kind(path)
    fields = settings.model_dump(exclude_unset=True)
    fields.update(detector=kind, model=path, format=FORMATS[dataset],
                  window="session" if dataset == "hdfs" else "count")
    return load_detector(Settings(**fields))


def session_options(settings: Settings) -> dict[str, Any]:
    """HDFS session windower options: the consumer's for `--format hdfs` (`windows.window_options`: gap,
    grace, caps, event-time bound), except that every block of a day may be open at once
    (`HDFS_SESSION_MAX_OPEN`) unless --session-max-open is given."""
    hdfs = window_options(settings.model_copy(update={"format": "hdfs"}))
    options = {name: value for name, value in hdfs.items() if name in SESSION_OPTIONS}
    if "session_max_open" not in settings.model_fields_set:
        options["max_open"] = HDFS_SESSION_MAX_OPEN
    return options


# --- command ----------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register `evaluate` and its flags."""
    from logstream.argparsing import DefaultsHelpFormatter
    from logstream.cliargs import add_settings_arguments

    parser = subparsers.add_parser(
        "evaluate", help="score a dump's test windows with a trained model and the baselines; write a report",
        description=__doc__.split("\n\n")[0] if __doc__ else None, formatter_class=DefaultsHelpFormatter,
        epilog=f"HDFS: unless --session-gap is given, sessions use a {HDFS_SESSION_GAP_S:g} s gap, the consumer's "
               "HDFS default too (a 300 s gap cuts most HDFS blocks into several sessions; see README).",
    )
    parser.add_argument("--model", required=True,
                        help=f"artifact directory (logllm, logllama), a novelty model file, or `{BASELINES_ONLY}` "
                             "to evaluate the baselines only")
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="which dump format and split rule (see README: Data and splits)")
    parser.add_argument("--logs", type=Path, required=True, help="log dump (plain or .gz; Liberty also LogLLM CSV)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, default=None, help="HDFS block labels (anomaly_label.csv)")
    labels.add_argument("--assume-normal", action="store_true",
                        help="no labels: treat every window as normal (HDFS needs no label file, line labels are "
                             "ignored) and report each detector's alarm rate (its FP share) on this traffic")
    parser.add_argument("--compare", type=Path, action="append", default=[], metavar="DIR",
                        help="another artifact scored on the same windows (repeatable), e.g. DIR/stage1 of a "
                             "LogLLaMA run to see what the reinforcement stage changed")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="windows to evaluate: the test split, or train and test together")
    parser.add_argument("--report", type=Path, required=True, help="directory for report.json, report.md, plots")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="at most N windows per split (seeded stratified sample, anomalies kept)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the HDFS split and of sampling")
    parser.add_argument("--train-fraction", type=float, default=0.8, help="share of the dump used for training")
    add_settings_arguments(parser, only=SETTINGS_FLAGS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from logstream.cliargs import command_settings, start_logging

    started = time.perf_counter()
    settings = command_settings(args, SETTINGS_FLAGS, "evaluate")
    if settings is None:
        return 2
    start_logging(settings.log_level)
    detector: Detector | None = None
    compared: dict[str, Detector] = {}
    try:
        try:
            if args.compare and args.model == BASELINES_ONLY:
                raise ValueError(f"--compare needs a model to compare with, not --model {BASELINES_ONLY}")
            if args.model != BASELINES_ONLY:
                detector = load_model(Path(args.model), settings, args.dataset)
            for path in args.compare:
                other = load_model(path, settings, args.dataset)
                label = f"{other.name} ({path.name})"
                compared[label if label not in compared else f"{other.name} ({path})"] = other
            split = load_split(
                args.dataset, args.logs, args.labels, seed=args.seed, train_fraction=args.train_fraction,
                window_size=settings.window_size, window_stride=settings.window_stride, max_windows=args.max_windows,
                assume_normal=args.assume_normal,
                **(session_options(settings) if args.dataset == "hdfs" else {}),
            )
        except (DetectorNotReady, ValueError, OSError) as exc:
            print(f"logstream-train evaluate: {exc}", file=sys.stderr)
            return 2
        summary = evaluate(split, args.report, detector=detector, model=args.model, part=args.split,
                           batch_size=settings.batch_size, seed=args.seed,
                           context={"argv": sys.argv[1:], "assume_normal": args.assume_normal},
                           compare=compared)
    finally:
        for loaded in ([detector] if detector is not None else []) + list(compared.values()):
            loaded.close()
    summary["total_seconds"] = round(time.perf_counter() - started, 3)
    print(headline(summary), file=sys.stderr, flush=True)  # for the terminal; stdout stays one JSON line
    print(orjson.dumps(summary).decode(), flush=True)
    return 0
