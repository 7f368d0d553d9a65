"""The evaluation report: `report.json` for machines, `report.md` with PNG plots for people, and
`report.html`, the same Markdown as one self-contained page (`trainer.report_html`).

Plots are drawn with matplotlib's object API (`Figure`, Agg canvas), never pyplot's global state,
so a report can be written from any thread or process without a display.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from logstream.atomicfile import atomic_path, write_atomic
from trainer.data import LabeledWindow
from trainer.evidence import EvidenceTally, evidence_markdown
from trainer.metrics import Confusion, ThresholdSweep, average_precision, confusion, threshold_sweep
from trainer.report_html import render_html


@dataclass
class DetectorRun:
    """One detector's verdicts on the evaluated windows (or why it could not be run)."""

    name: str
    role: str  # "model" or "baseline"
    version: str = ""
    labels: list[bool] = field(default_factory=list)
    predicted: list[bool] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    seconds: float = 0.0  # scoring wall time
    fit_seconds: float | None = None  # baselines: fitting on the train split
    evidence: EvidenceTally = field(default_factory=EvidenceTally)  # top-3 evidence hit rate on true positives
    skipped: str | None = None  # why there are no verdicts

    @property
    def confusion(self) -> Confusion:
        return confusion(self.labels, self.predicted)

    @property
    def sweep(self) -> ThresholdSweep:
        return threshold_sweep(self.labels, self.scores)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "role": self.role, "version": self.version}
        if self.skipped is not None:
            return {**body, "skipped": self.skipped}
        best = self.sweep.best_f1()
        ap = average_precision(self.labels, self.scores)
        return {
            **body,
            **self.confusion.as_dict(),
            "average_precision": None if ap is None else round(ap, 6),
            "best_threshold_on_this_split": None if best is None else {"threshold": best[0], "f1": round(best[1], 6)},
            "seconds": round(self.seconds, 3),
            "windows_per_second": round(len(self.labels) / self.seconds, 2) if self.seconds > 0 else None,
            "fit_seconds": None if self.fit_seconds is None else round(self.fit_seconds, 3),
        }


PLOTS = {"confusion": "confusion.png", "scores": "scores.png", "precision_recall": "precision_recall.png"}


def write_report(
    outdir: Path,
    runs: Sequence[DetectorRun],
    windows: Sequence[LabeledWindow],
    *,
    summary: dict[str, Any],
    data: dict[str, Any],
    context: dict[str, Any],
) -> dict[str, Any]:
    """Write report.json, report.md, report.html (self-contained), the plots and predictions.jsonl; return the JSON.

    `runs[0]` is the primary detector (its mistakes are listed); `summary` is the one-line result,
    `data` the split statistics, `context` what was evaluated (model, split part, command).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    scored = [run for run in runs if run.skipped is None]
    _plot_confusions(outdir / PLOTS["confusion"], scored)
    _plot_scores(outdir / PLOTS["scores"], scored)
    _plot_precision_recall(outdir / PLOTS["precision_recall"], scored)
    _write_predictions(outdir / "predictions.jsonl", scored, windows)
    body = {
        "summary": summary,
        "context": context,
        "detectors": [run.as_dict() for run in runs],
        "data": data,
        "files": {**PLOTS, "markdown": "report.md", "html": "report.html", "predictions": "predictions.jsonl"},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(outdir / "report.json", orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    markdown = _markdown(body, runs, windows)
    write_atomic(outdir / "report.md", markdown.encode())
    title = f"Evaluation: {context.get('model')} on {data.get('dataset')}"
    write_atomic(outdir / "report.html", render_html(markdown, outdir, title).encode())
    return body


def _write_predictions(path: Path, runs: Sequence[DetectorRun], windows: Sequence[LabeledWindow]) -> None:
    """One line per window: identity, truth, and each detector's verdict (for error analysis)."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        for index, item in enumerate(windows):
            window = item.window
            row = {
                "window_id": window.window_id, "key": window.key, "first_offset": window.first_offset,
                "last_offset": window.last_offset, "size": window.size, "label": item.label,
                "verdicts": {run.name: {"anomalous": run.predicted[index], "score": run.scores[index]} for run in runs},
            }
            handle.write(orjson.dumps(row) + b"\n")


# --- plots ------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_confusions(path: Path, runs: Sequence[DetectorRun]) -> None:
    fig = _figure(3.6 * max(1, len(runs)), 3.4)
    axes = fig.subplots(1, max(1, len(runs)), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        counts = run.confusion
        grid = [[counts.tn, counts.fp], [counts.fn, counts.tp]]
        peak = max(1, max(max(row) for row in grid))
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=peak)
        for r in range(2):
            for c in range(2):
                ax.text(c, r, str(grid[r][c]), ha="center", va="center",
                        color="white" if grid[r][c] > peak / 2 else "black", fontsize=13)
        ax.set_xticks([0, 1], ["normal", "anomalous"])
        ax.set_yticks([0, 1], ["normal", "anomalous"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{run.name}\nF1 {counts.f1:.3f}", fontsize=10)
    if not runs:
        axes[0].text(0.5, 0.5, "no detector produced verdicts", ha="center", va="center")
    fig.savefig(path)


def _plot_scores(path: Path, runs: Sequence[DetectorRun]) -> None:
    fig = _figure(4.2 * max(1, len(runs)), 3.4)
    axes = fig.subplots(1, max(1, len(runs)), squeeze=False)[0]
    bins = [i * 5.0 for i in range(21)]
    for ax, run in zip(axes, runs):
        normal = [s for s, label in zip(run.scores, run.labels) if not label]
        anomalous = [s for s, label in zip(run.scores, run.labels) if label]
        ax.hist([normal, anomalous], bins=bins, label=[f"normal ({len(normal)})", f"anomalous ({len(anomalous)})"],
                color=["tab:blue", "tab:red"], log=True)
        ax.set_xlabel("score (0-100)")
        ax.set_ylabel("windows (log)")
        ax.set_title(run.name, fontsize=10)
        ax.legend(fontsize=8)
    fig.savefig(path)


def _plot_precision_recall(path: Path, runs: Sequence[DetectorRun]) -> None:
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    for run in runs:
        sweep = run.sweep
        if not sweep.thresholds:
            continue
        line = left.step([0.0] + sweep.recall, [sweep.precision[0]] + sweep.precision, where="post", label=run.name)
        counts = run.confusion
        left.plot([counts.recall], [counts.precision], "o", color=line[0].get_color())
    left.set_xlim(-0.02, 1.02)
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("recall")
    left.set_ylabel("precision")
    left.set_title("precision-recall over the score threshold (dot: verdicts as given)", fontsize=10)
    if runs:
        left.legend(fontsize=8, loc="lower left")
        primary = runs[0]
        sweep = primary.sweep
        right.plot(sweep.thresholds, sweep.precision, label="precision", drawstyle="steps-post")
        right.plot(sweep.thresholds, sweep.recall, label="recall", drawstyle="steps-post")
        right.plot(sweep.thresholds, sweep.f1, label="F1", drawstyle="steps-post")
        right.set_xlabel("threshold: anomalous when score >= threshold")
        right.set_title(f"{primary.name}: metrics by threshold", fontsize=10)
        right.set_xlim(101, -1)
        right.set_ylim(-0.02, 1.02)
        right.legend(fontsize=8)
    fig.savefig(path)


# --- markdown ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _side_by_side(validation: dict[str, Any], test: dict[str, Any]) -> str:
    """Validation (where the stage and the threshold were chosen) next to this split, per detector."""
    rows = ["## Validation and test side by side\n",
            f"Validation: {validation['windows']} windows ({validation['anomalous_windows']} anomalous), held out "
            "of the train split; the stage and the decision threshold were chosen on it. Test: the windows above.\n",
            "| detector | validation P / R / F1 | test P / R / F1 |", "|---|---|---|"]

    def prf(entry: dict[str, Any] | None) -> str:
        if not entry or "f1" not in entry:
            return "–"
        return f"{_fmt(entry['precision'])} / {_fmt(entry['recall'])} / {_fmt(entry['f1'])}"

    rows.append(f"| {test['detector']} | {prf(validation)} | {prf(test)} |")
    for name, entry in test.get("baselines", {}).items():
        rows.append(f"| {name} | {prf(validation.get('baselines', {}).get(name))} | {prf(entry)} |")
    return "\n".join(rows) + "\n"


def _markdown(body: dict[str, Any], runs: Sequence[DetectorRun], windows: Sequence[LabeledWindow]) -> str:
    context, data, summary = body["context"], body["data"], body["summary"]
    out: list[str] = []
    add = out.append
    add(f"# Evaluation: {context['model']} on {data.get('dataset')} ({context['part']} windows)\n")
    add(f"Created {body['created_at']}. Logs: `{data.get('logs')}`"
        + (f", labels: `{data['labels']}`" if data.get("labels") else "") + ".\n")
    if context.get("note"):
        add(f"> {context['note']}\n")
    add("## Results\n")
    add("| detector | role | precision | recall | F1 | TP | FP | FN | TN | avg. precision | windows/s | fit s |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for entry in body["detectors"]:
        if "skipped" in entry:
            add("| " + " | ".join([entry["name"], entry["role"], f"skipped: {entry['skipped']}"] + ["–"] * 9) + " |")
            continue
        add("| " + " | ".join([
            entry["name"], entry["role"], _fmt(entry["precision"]), _fmt(entry["recall"]), _fmt(entry["f1"]),
            str(entry["tp"]), str(entry["fp"]), str(entry["fn"]), str(entry["tn"]),
            _fmt(entry["average_precision"]), _rate(entry["windows_per_second"]), _fmt(entry["fit_seconds"]),
        ]) + " |")
    add("")
    for entry in body["detectors"]:
        if entry.get("undefined"):
            add(f"- {entry['name']}: {', '.join(entry['undefined'])} undefined (zero denominator), shown as 0.")
        best = entry.get("best_threshold_on_this_split")
        if best is not None:
            add(f"- {entry['name']}: best F1 over score thresholds on this split {best['f1']:.3f} at score >= "
                f"{best['threshold']:g} (tuned on the evaluated windows: optimistic).")
    add(f"\nEvaluated {summary['windows']} windows ({summary['anomalous_windows']} anomalous). "
        f"Primary detector scored them in {summary['seconds']:.2f} s.\n")
    if summary.get("evidence"):
        add(evidence_markdown(summary["evidence"]))
    if context.get("validation"):
        add(_side_by_side(context["validation"], summary))

    add("## Data and split\n")
    add(f"- Split: {data.get('split_rule')}; seed {data.get('seed')}, train fraction {data.get('train_fraction')}.")
    add(f"- Windows: {_describe_window(data.get('window', {}))}.")
    for part in ("train", "test"):
        info = data.get(part, {})
        capped = info.get("before_cap", {})
        was_capped = data.get("max_windows") and capped.get("windows") != info.get("windows")
        extra = (f" (capped from {capped['windows']} / {capped['anomalous']} by --max-windows "
                 f"{data.get('max_windows')})" if was_capped else "")
        add(f"- {part}: {info.get('windows')} windows, {info.get('anomalous')} anomalous{extra}.")
    lines = data.get("lines", {})
    add(f"- Lines: {lines.get('records')} records read, {lines.get('skipped', 0)} skipped"
        + (f" ({_counts(data.get('skipped_lines', {}))})" if data.get("skipped_lines") else "") + ".")
    if data.get("skipped_windows"):
        add(f"- Windows dropped: {_counts(data['skipped_windows'])}.")
    overlap = data.get("overlap", {})
    test_windows = data.get("test", {}).get("windows", 0)
    add(f"- **Verbatim overlap**: {overlap.get('test_windows_in_train', 0)} of {test_windows} test windows "
        f"({overlap.get('anomalous', 0)} anomalous, {overlap.get('normal', 0)} normal) repeat a train window's "
        f"masked message sequence exactly; {overlap.get('label_conflicts', 0)} of them with the other label. "
        "A model can score those from memory.")
    timing = data.get("time")
    if timing:
        add(f"- Time order: {timing.get('test_lines_older_than_train_end')} test lines are older than the last "
            "train line.")
    sessions = data.get("sessions")
    if sessions:
        add(f"- Sessions: {sessions['blocks_labeled']} labelled blocks ({sessions['unlabeled_blocks']} unlabelled "
            f"dropped); {sessions['blocks_in_several_sessions']} blocks split into several sessions; close reasons "
            f"{_counts(sessions['close_reasons'])}.")
    add("")

    add("## Plots\n")
    add("Confusion matrices (rows: actual, columns: predicted):\n")
    add(f"![confusion matrices]({PLOTS['confusion']})\n")
    add("Score distribution by class:\n")
    add(f"![scores by class]({PLOTS['scores']})\n")
    add("Precision-recall over the score threshold:\n")
    add(f"![precision-recall]({PLOTS['precision_recall']})\n")

    primary = next((run for run in runs if run.skipped is None), None)
    if primary is not None:
        add(f"## Mistakes of {primary.name}\n")
        add("Per-window verdicts of every detector are in `predictions.jsonl`.\n")
        sections = (("Missed anomalies (false negatives)", True), ("False alarms (false positives)", False))
        for title, want_label in sections:
            mistakes = [i for i, (truth, guess) in enumerate(zip(primary.labels, primary.predicted))
                        if truth == want_label and guess != truth]
            add(f"### {title}: {len(mistakes)}\n")
            for index in mistakes[:10]:
                window = windows[index].window
                common = Counter(window.templates).most_common(3)
                templates = "; ".join(f"{count}× `{_clip(t)}`" for t, count in common)
                add(f"- `{window.key}` offsets {window.first_offset}–{window.last_offset}, {window.size} lines, "
                    f"score {primary.scores[index]:g}: {templates}")
            add("")
    add("## How to read this\n")
    add("A window is anomalous when it holds an anomalous line (BGL, Thunderbird, Liberty) or belongs to an "
        "anomalous block (HDFS). Baselines are fitted on the train split only. `novelty` flags any template "
        "never seen in normal training lines; `count_vector` is logistic regression on template counts.\n")
    return "\n".join(out)


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _clip(text: str, limit: int = 90) -> str:
    text = text.replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items())


def _describe_window(window: dict[str, Any]) -> str:
    if window.get("kind") == "count":
        return f"count windows of {window.get('size')} lines, stride {window.get('stride')}"
    options = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in window.items() if k != "kind")
    return f"session windows by block id ({options})"


def headline(evaluation: dict[str, Any]) -> str:
    """One line for a person reading the terminal: the detector's test figures, the baselines' F1 beside
    them, and where the report is. `evaluation` is an `evaluate` summary (also `fit`'s "evaluation")."""
    name = evaluation.get("detector") or "baselines"
    figures = ", ".join(f"{label} {_fmt(evaluation.get(key))}" for label, key in
                        (("P", "precision"), ("R", "recall"), ("AP", "average_precision")))
    text = (f"{name}: F1 {_fmt(evaluation.get('f1'))} ({figures}) on {evaluation.get('windows')} "
            f"{evaluation.get('split', 'test')} windows ({evaluation.get('anomalous_windows')} anomalous)")
    baselines = evaluation.get("baselines") or {}
    if baselines:
        text += "; baselines F1: " + ", ".join(f"{b} {_fmt(v.get('f1'))}" for b, v in baselines.items())
    if evaluation.get("report"):
        text += f"; report: {evaluation['report']}"
    return text
