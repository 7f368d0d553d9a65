"""`logstream demo`: the whole path on one machine, with nothing but the installed package.

Starts the embedded broker, streams a real BGL sample into a raw topic at a steady rate, runs the
consumer (count windows of 100 lines; LogLLM on the embedded small models by default) in this
process, and prints each alert as it arrives on the alerts topic, then a summary against the
sample's own labels.
"""

from __future__ import annotations

import importlib.resources
import sys
import threading
import time
from pathlib import Path

from logstream.broker import EmbeddedBroker
from logstream.logs import configure_logging
from logstream.pipeline import Pipeline
from logstream.producer import create_topic, produce_file
from logstream.settings import Settings
from logstream.tail import tail_alerts

RAW_TOPIC = "demo.logs.raw"
ALERTS_TOPIC = "demo.logs.alerts"


def sample_path(name: str) -> Path:
    return Path(str(importlib.resources.files("logstream") / "samples" / name))


def _anomalous_windows(lines: int) -> tuple[int, set[int]]:
    """Windows of the first `lines` sample lines, and the first offsets of those holding an alert-tagged line.

    The demo's raw topic is fresh and has one partition, so line i of the sample is offset i and the
    100-line window k starts at offset 100 k.
    """
    windows, anomalous = 0, set()
    with sample_path("BGL_2k.log").open("rb") as handle:
        for number, raw in enumerate(handle):
            if number >= lines:
                break
            windows = number // 100 + 1
            if not raw.startswith(b"- "):
                anomalous.add(number // 100 * 100)
    return windows, anomalous


SHIPPED_MODELS = {"logllm": "logllm-bgl", "novelty": "bgl-novelty.json"}  # trained on BGL; see samples/NOTICE.md


def run_demo(detector: str = "logllm", model: Path | None = None, lines: int = 2000,
             keep_broker: bool = False) -> int:
    """Without `--model`, the detector's shipped BGL model: LogLLM on the embedded base models
    (its artifact records their hashes, so other base files are refused at load), or novelty.
    LogLLaMA ships none: train one with `logstream-train fit-logllama --dataset bgl ...`."""
    configure_logging("WARNING")
    if model is None:
        if detector not in SHIPPED_MODELS:
            print(f"logstream demo --detector {detector} needs --model DIR: an artifact trained on BGL "
                  "(logstream-train fit-logllama --dataset bgl ...)", file=sys.stderr)
            return 2
        model = sample_path(SHIPPED_MODELS[detector])
    from logstream.detectors.base import DetectorNotReady  # noqa: PLC0415 - heavy, only here
    from logstream.detectors.registry import load_detector  # noqa: PLC0415

    options = {"input_topic": [RAW_TOPIC], "alerts_topic": ALERTS_TOPIC, "dlq_topic": "demo.logs.dlq",
               "group_id": "logstream-demo", "format": "bgl", "window": "count", "detector": detector, "model": model,
               "commit_interval_s": 1.0, "once": False}
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
                                path=sample_path("BGL_2k.log"), rate=400.0, limit=lines)
            print(f"streamed {sent} BGL lines into {RAW_TOPIC}", file=sys.stderr)

        feeder = threading.Thread(target=feed, name="logstream-demo-feed", daemon=True)
        feeder.start()
        consumer_thread.start()
        print(f"printing alerts from {ALERTS_TOPIC} as they arrive (detector: {detector})", file=sys.stderr)
        tail_stop = threading.Event()
        started = time.monotonic()
        alerted: list[int] = []
        seen = tail_alerts(broker.bootstrap_servers, ALERTS_TOPIC, stop=tail_stop, from_beginning=True,
                           idle_exit_s=30.0,  # the LLM judges a batch in seconds on CPU
                           on_alert=lambda alert: alerted.append(int(alert["source"]["first_offset"])))
        stop.set()
        consumer_thread.join(60)
        windows, anomalous = _anomalous_windows(lines)
        right = sum(1 for offset in alerted if offset in anomalous)
        print(f"\n{seen} alerts in {time.monotonic() - started:.0f}s: {right} on windows with an alert-tagged "
              f"line, {len(alerted) - right} on clean windows. The sample holds {windows} windows of 100 lines, "
              f"{len(anomalous)} with an alert-tagged (anomalous) line.", file=sys.stderr)
        if keep_broker:
            print(f"broker left running at {broker.bootstrap_servers} (Ctrl-C to stop)", file=sys.stderr)
            threading.Event().wait()
    finally:
        broker.close()
    return 0
