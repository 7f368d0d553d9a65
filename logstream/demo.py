"""`logstream demo`: the whole path on one machine, with nothing but the installed package.

Starts the embedded broker, streams a real log sample into a raw topic (BGL by default, count
windows of 100 lines; `--dataset hdfs`: block sessions), runs the consumer (LogLLM on the embedded
small models and the shipped artifact for that dataset by default) in this process, and prints
each alert as it arrives on the alerts topic, then precision and recall against the sample's own
labels.
"""

from __future__ import annotations

import csv
import importlib.resources
import itertools
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logstream.broker import EmbeddedBroker
from logstream.logs import configure_logging
from logstream.parsing import block_ids
from logstream.pipeline import Pipeline
from logstream.producer import create_topic, produce_file
from logstream.settings import Settings
from logstream.tail import tail_alerts

RAW_TOPIC = "demo.logs.raw"
ALERTS_TOPIC = "demo.logs.alerts"


def sample_path(name: str) -> Path:
    return Path(str(importlib.resources.files("logstream") / "samples" / name))


@dataclass(frozen=True, slots=True)
class DemoDataset:
    """One shipped sample and how the consumer windows it."""

    name: str
    sample: str
    format: str
    window: str  # count | session
    models: dict[str, str]  # detector -> shipped model in samples/ (see samples/NOTICE.md)
    labels: str | None = None  # per-block label file (HDFS)


DATASETS = {
    "bgl": DemoDataset("bgl", "BGL_2k.log", "bgl", "count", {"logllm": "logllm-bgl", "novelty": "bgl-novelty.json"}),
    # whole block sessions (HDFS_2k.log holds 2,000 lines of 2,200 blocks: fragments that no model
    # trained on whole sessions can judge); samples/NOTICE.md says how they were chosen
    "hdfs": DemoDataset("hdfs", "HDFS_sessions_demo.log", "hdfs", "session", {"logllm": "logllm-hdfs"},
                        labels="anomaly_label_HDFS_sessions_demo.csv"),
}


def _bgl_truth(dataset: DemoDataset, lines: int | None) -> tuple[int, set[str]]:
    """Windows of the first `lines` BGL sample lines, and the ids of those holding an alert-tagged line.

    The demo's raw topic is fresh and has one partition, so line i of the sample is offset i and the
    100-line window k starts at offset 100 k; a window is identified by its first offset.
    """
    windows, anomalous = 0, set()
    with sample_path(dataset.sample).open("rb") as handle:
        for number, raw in enumerate(itertools.islice(handle, lines)):  # lines None: the whole sample
            windows = number // 100 + 1
            if not raw.startswith(b"- "):
                anomalous.add(str(number // 100 * 100))
    return windows, anomalous


def _hdfs_truth(dataset: DemoDataset, lines: int | None) -> tuple[int, set[str]]:
    """Blocks named in the first `lines` HDFS sample lines (one session window each), and the anomalous ones."""
    assert dataset.labels is not None
    labels: dict[str, bool] = {}
    with sample_path(dataset.labels).open(encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if len(row) == 2 and row[1] in ("Normal", "Anomaly"):
                labels[row[0]] = row[1] == "Anomaly"
    blocks: set[str] = set()
    with sample_path(dataset.sample).open(encoding="utf-8", errors="replace") as handle:
        for text in itertools.islice(handle, lines):
            blocks.update(block for block in block_ids(text) if block in labels)
    return len(blocks), {block for block in blocks if labels[block]}


def _summary(dataset: DemoDataset, lines: int | None, alerted: list[str], seen: int, seconds: float) -> str:
    """The closing line: alerts against the sample's own labels, with precision and recall."""
    if dataset.name == "bgl":
        windows, anomalous = _bgl_truth(dataset, lines)
        unit, marked, holds = "windows", "with an alert-tagged line", "windows of 100 lines"
        kind = "with an alert-tagged (anomalous) line"
    else:
        windows, anomalous = _hdfs_truth(dataset, lines)
        unit, marked, holds, kind = "blocks", "labelled Anomaly", "block sessions", "labelled Anomaly"
    distinct = set(alerted)
    right = len(distinct & anomalous)
    precision = right / len(distinct) if distinct else 0.0
    recall = right / len(anomalous) if anomalous else 0.0
    return (f"\n{seen} alerts in {seconds:.0f}s: {right} on {unit} {marked}, {len(distinct) - right} on clean "
            f"{unit}. The sample holds {windows} {holds}, {len(anomalous)} {kind}. Against these labels: "
            f"precision {precision:.2f}, recall {recall:.2f}.")


def run_demo(detector: str = "logllm", model: Path | None = None, lines: int | None = None,
             keep_broker: bool = False, dataset: str = "bgl") -> int:
    """Without `--model`, the detector's shipped model for the dataset: LogLLM on the embedded base
    models (its artifact records their hashes, so other base files are refused at load), or novelty
    (BGL). LogLLaMA ships none: train one with `logstream-train fit-logllama --dataset bgl ...`.

    BGL lines stream at 400 lines/s into 100-line count windows. HDFS windows are block sessions
    that stay open up to a day of quiet, so the HDFS demo streams the sample, then runs the consumer
    as `logstream run --once` does: to the end of the topic, every session closed and judged.
    """
    configure_logging("WARNING")
    if dataset not in DATASETS:
        print(f"logstream demo: unknown dataset {dataset!r}; choose {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    chosen = DATASETS[dataset]
    if model is None:
        if detector not in chosen.models:
            print(f"logstream demo --detector {detector} --dataset {dataset} needs --model DIR: no shipped "
                  f"{detector} model for {dataset} (train one with logstream-train)", file=sys.stderr)
            return 2
        model = sample_path(chosen.models[detector])
    from logstream.detectors.base import DetectorNotReady  # noqa: PLC0415 - heavy, only here
    from logstream.detectors.registry import load_detector  # noqa: PLC0415

    once = chosen.window == "session"
    options = {"input_topic": [RAW_TOPIC], "alerts_topic": ALERTS_TOPIC, "dlq_topic": "demo.logs.dlq",
               "group_id": "logstream-demo", "format": chosen.format, "window": chosen.window, "detector": detector,
               "model": model, "commit_interval_s": 1.0, "once": once}
    try:
        scorer = load_detector(Settings(**options))  # before the broker: a model that cannot load stops here, plainly
    except DetectorNotReady as exc:
        print(f"logstream demo: {exc}", file=sys.stderr)
        return 2
    broker = EmbeddedBroker().start()
    print(f"embedded broker at {broker.bootstrap_servers}", file=sys.stderr)
    try:
        settings = Settings(bootstrap_servers=broker.bootstrap_servers, **options)
        for topic in (RAW_TOPIC, ALERTS_TOPIC):  # before anyone subscribes to them
            create_topic(broker.bootstrap_servers, topic)
        stop = threading.Event()
        pipeline = Pipeline(settings, scorer, stop_event=stop)
        consumer_thread = threading.Thread(target=pipeline.run, name="logstream-demo-consumer", daemon=True)

        def feed() -> None:
            sent = produce_file(bootstrap_servers=broker.bootstrap_servers, topic=RAW_TOPIC,
                                path=sample_path(chosen.sample), rate=400.0, limit=lines)
            print(f"streamed {sent} {dataset.upper()} lines into {RAW_TOPIC}", file=sys.stderr)

        feeder = threading.Thread(target=feed, name="logstream-demo-feed", daemon=True)
        feeder.start()
        if once:  # the consumer reads to the end offsets it finds at start: the whole sample first
            feeder.join()
        consumer_thread.start()
        print(f"printing alerts from {ALERTS_TOPIC} as they arrive (detector: {detector}, dataset: {dataset})",
              file=sys.stderr)
        tail_stop = threading.Event()
        started = time.monotonic()
        alerted: list[str] = []

        def identify(alert: dict[str, Any]) -> None:
            alerted.append(str(alert["window"]["key"] if once else alert["source"]["first_offset"]))

        seen = tail_alerts(broker.bootstrap_servers, ALERTS_TOPIC, stop=tail_stop, from_beginning=True,
                           idle_exit_s=30.0,  # the LLM judges a batch in seconds on CPU
                           on_alert=identify)
        stop.set()
        consumer_thread.join(60)
        print(_summary(chosen, lines, alerted, seen, time.monotonic() - started), file=sys.stderr)
        if keep_broker:
            print(f"broker left running at {broker.bootstrap_servers} (Ctrl-C to stop)", file=sys.stderr)
            threading.Event().wait()
    finally:
        broker.close()
    return 0
