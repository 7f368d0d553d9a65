"""`logstream demo`: the whole path on one machine, with nothing but the installed package.

Starts the embedded broker, streams a real log sample into a raw topic (BGL by default, count
windows of 100 lines; `--dataset hdfs`: block sessions), runs the consumer (LogLLM on the embedded
small models and the shipped artifact for that dataset by default) in this process, and prints
each alert as it arrives on the alerts topic, then precision and recall against the sample's own
labels.
"""

from __future__ import annotations

import importlib.resources
import itertools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from logstream.broker import EmbeddedBroker
from logstream.cliargs import start_logging
from logstream.files import read_block_labels
from logstream.kafka import client_config
from logstream.parsing import block_ids
from logstream.pipeline import Pipeline
from logstream.producer import create_topic, produce_file
from logstream.settings import WINDOW_SIZE, Settings
from logstream.tail import tail_alerts

RAW_TOPIC = "demo.logs.raw"
ALERTS_TOPIC = "demo.logs.alerts"
DEMO_WAIT_S = 600.0  # longest wait for the consumer to judge the sample before the summary
DRAIN_S = 2.0  # after the sample is judged: quiet this long on the alerts topic and the tail stops


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
    100-line (`WINDOW_SIZE`, the consumer's default) window k starts at offset 100 k; a window is
    identified by its first offset.
    """
    windows, anomalous = 0, set()
    with sample_path(dataset.sample).open("rb") as handle:
        for number, raw in enumerate(itertools.islice(handle, lines)):  # lines None: the whole sample
            windows = number // WINDOW_SIZE + 1
            if not raw.startswith(b"- "):
                anomalous.add(str(number // WINDOW_SIZE * WINDOW_SIZE))
    return windows, anomalous


def _hdfs_truth(dataset: DemoDataset, lines: int | None) -> tuple[int, set[str]]:
    """Blocks named in the first `lines` HDFS sample lines (one session window each), and the anomalous ones."""
    assert dataset.labels is not None
    labels = read_block_labels(sample_path(dataset.labels))
    blocks: set[str] = set()
    with sample_path(dataset.sample).open(encoding="utf-8", errors="replace") as handle:
        for text in itertools.islice(handle, lines):
            blocks.update(block for block in block_ids(text) if block in labels)
    return len(blocks), {block for block in blocks if labels[block]}


def wait_committed(bootstrap_servers: str, group: str, topic: str, target: int, timeout_s: float,
                   alive: Callable[[], bool]) -> bool:
    """Block until `group`'s committed offsets on `topic` add up to `target` (True), or `timeout_s` passes
    or the consumer stops (`alive()` false) first (False).

    The consumer commits a line's offset in the transaction that publishes the alerts of the windows
    before it, so a commit at `target` means every window ending before it is judged and published.
    Reads committed offsets only: the throwaway client never joins the group."""
    consumer = Consumer({**client_config(bootstrap_servers), "group.id": group, "enable.auto.commit": False})
    deadline = time.monotonic() + timeout_s
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        while time.monotonic() < deadline and alive():
            committed = consumer.committed(partitions, timeout=10)
            if sum(max(tp.offset, 0) for tp in committed) >= target:
                return True
            time.sleep(0.5)
        return False
    finally:
        consumer.close()


class AlertTail:
    """Prints the demo's alerts as they arrive, on its own thread, until `finish`.

    The demo does not stop at a quiet spell (on a busy CPU the LLM can be silent for longer than any
    fixed idle time): it stops once the consumer has judged the sample and no alert came for
    `DRAIN_S` after that. An error of the tail (e.g. the broker gone) is raised by `finish`."""

    def __init__(self, bootstrap_servers: str, on_alert: Callable[[dict[str, Any]], None]) -> None:
        self._stop = threading.Event()
        self._error: list[BaseException] = []

        def follow() -> None:
            try:
                tail_alerts(bootstrap_servers, ALERTS_TOPIC, stop=self._stop, from_beginning=True, on_alert=on_alert)
            except BaseException as exc:  # re-raised on the demo's thread by finish()
                self._error.append(exc)

        self._thread = threading.Thread(target=follow, name="logstream-demo-tail", daemon=True)
        self._thread.start()

    def finish(self, count: Callable[[], int]) -> int:
        """Wait until `count()` (alerts so far: `on_alert` is called once per alert printed) stays put for
        DRAIN_S, stop the tail; returns `count()`."""
        last, quiet_since = count(), time.monotonic()
        while time.monotonic() - quiet_since < DRAIN_S and self._thread.is_alive():
            time.sleep(0.2)
            if count() != last:
                last, quiet_since = count(), time.monotonic()
        self._stop.set()
        self._thread.join(30)
        if self._error:
            raise self._error[0]
        return count()


def _summary(dataset: DemoDataset, lines: int | None, alerted: list[str], seen: int, seconds: float) -> str:
    """The closing line: alerts against the sample's own labels, with precision and recall."""
    if dataset.name == "bgl":
        windows, anomalous = _bgl_truth(dataset, lines)
        unit, marked, holds = "windows", "with an alert-tagged line", f"windows of {WINDOW_SIZE} lines"
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
    start_logging("WARNING")  # the demo's settings read LOGSTREAM_* variables too
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

        sent: list[int] = []

        def feed() -> None:
            sent.append(produce_file(bootstrap_servers=broker.bootstrap_servers, topic=RAW_TOPIC,
                                     path=sample_path(chosen.sample), rate=400.0, limit=lines))
            print(f"streamed {sent[0]} {dataset.upper()} lines into {RAW_TOPIC}", file=sys.stderr)

        feeder = threading.Thread(target=feed, name="logstream-demo-feed", daemon=True)
        feeder.start()
        if once:  # the consumer reads to the end offsets it finds at start: the whole sample first
            feeder.join()
        consumer_thread.start()
        print(f"printing alerts from {ALERTS_TOPIC} as they arrive (detector: {detector}, dataset: {dataset})",
              file=sys.stderr)
        started = time.monotonic()
        alerted: list[str] = []

        def identify(alert: dict[str, Any]) -> None:
            alerted.append(str(alert["window"]["key"] if once else alert["source"]["first_offset"]))

        tail = AlertTail(broker.bootstrap_servers, identify)
        feeder.join()
        if once:  # `run --once`: returns once every session is closed, judged, published and committed
            consumer_thread.join(DEMO_WAIT_S)
            finished = not consumer_thread.is_alive()
        else:  # live: the complete windows are judged once the group's commit reaches the last of their lines
            complete = (sent[0] // WINDOW_SIZE) * WINDOW_SIZE if sent else 0
            finished = wait_committed(broker.bootstrap_servers, str(options["group_id"]), RAW_TOPIC, complete,
                                      DEMO_WAIT_S, consumer_thread.is_alive)
        if not finished:
            print(f"logstream demo: the consumer had not judged the whole sample after {DEMO_WAIT_S:.0f}s; "
                  "the figures below count the alerts so far", file=sys.stderr)
        seen = tail.finish(lambda: len(alerted))
        stop.set()
        consumer_thread.join(60)
        print(_summary(chosen, lines, alerted, seen, time.monotonic() - started), file=sys.stderr)
        if keep_broker:
            print(f"broker left running at {broker.bootstrap_servers} (Ctrl-C to stop)", file=sys.stderr)
            threading.Event().wait()
    finally:
        broker.close()
    return 0
