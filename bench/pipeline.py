"""Throughput of the consumer against a raw Kafka consumer, measured in one run against one broker.

For each workload (BGL lines in 100-line count windows, HDFS lines in session windows) the script
starts its own embedded broker, produces N real log lines into a one-partition topic, then reads
the same N lines with
  (a) a raw confluent-kafka consumer that does nothing with them, and
  (b) the consumer exactly as `logstream run --once` runs it (the same `Pipeline` the CLI builds, in
      this process: parse, mask, window, score, build and publish the verdicts, commit), in each of
      its configurations (readers, below),
alternately, `--repeats` times each (one round runs every reader once, in a fixed order). Both
clocks start when the partition is assigned (group join, imports and the broker start are
excluded) and stop when the last line is handled: for (a) at the N-th record, for (b) when `run()`
returns, i.e. after every verdict is acknowledged, the offsets are committed and the consumer has
left its group. Two clocks are kept: wall time, and CPU time of this process (all its threads,
librdkafka's included; not the broker's), which is the steadier figure on a shared machine. A third,
the steady state, is wall time from the first records in hand (for (a) its first non-empty consume,
for (b) the first batch handed to ingest) to the same end: the broker's first fetch after an
assignment takes ~0.1-0.2 s for either reader, which at 200k lines is most of the raw consumer's
time and flatters the ratio of the first clock; the steady-state ratio is the per-line cost. This
process is pinned to one core (`--cpu`, default 0) after the broker started; the broker is not
pinned.

logstream readers per workload:
  null          --detector null with the default --emit anomalous (null never alerts: no alert documents)
  null/all      --detector null --emit all (one alert document per window: the output path's cost)
  novelty       --detector novelty, default --emit, with a model fitted by this script on the workload's
                sample file (lines labelled normal) before the clocks start

    python bench/pipeline.py                      # both workloads, 200k lines, best of 3
    python bench/pipeline.py --lines 50000 --repeats 1 --workload count
    python bench/pipeline.py --profile runs/prof  # also write a pyinstrument profile of one run per reader

Prints lines/s of each reader and the ratio logstream / raw (goals, issue 16: >= 0.5 on count
windows, >= 0.3 on session windows, null detector with the default --emit).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from logstream.broker import EmbeddedBroker  # noqa: E402
from logstream.cli import build_parser, settings_from  # noqa: E402
from logstream.detectors.novelty import NoveltyDetector  # noqa: E402
from logstream.detectors.registry import load_detector  # noqa: E402
from logstream.files import iter_log_lines  # noqa: E402
from logstream.logs import configure_logging  # noqa: E402
from logstream.metrics import Health, Metrics  # noqa: E402
from logstream.parsing import LineParser  # noqa: E402
from logstream.pipeline import Pipeline  # noqa: E402
from logstream.settings import Settings  # noqa: E402

DATA = REPO.parent / "shared" / "data"
_HDFS_BLOCK = re.compile(rb"(blk_-?\d+)")


@dataclass(frozen=True)
class Workload:
    name: str
    path: Path
    format: str
    flags: tuple[str, ...]


def workloads(data: Path) -> dict[str, Workload]:
    return {
        "count": Workload("count", data / "BGL" / "BGL_train_sample.log", "bgl",
                          ("--window", "count", "--window-size", "100")),
        "session": Workload("session", data / "HDFS" / "HDFS_train_sample.log", "hdfs",
                            ("--window", "session", "--session-gap", "300")),
    }


def repeated_lines(workload: Workload, n: int) -> Iterator[bytes]:
    """N lines of the sample, repeated as needed.

    HDFS repeats get their block ids suffixed and their year moved forward, so a repeat is new
    sessions later in event time, as in a longer real log, rather than a flood of late lines.
    """
    lines = [line.rstrip(b"\r\n") for line in workload.path.read_bytes().splitlines() if line.strip()]
    sent = 0
    for round_ in range(n // len(lines) + 1):
        for line in lines:
            if sent >= n:
                return
            if round_ and workload.format == "hdfs":
                year = int(line[:2]) + round_
                line = b"%02d" % year + _HDFS_BLOCK.sub(rb"\g<1>%d" % round_, line[2:])
            yield line
            sent += 1


def produce(bootstrap: str, topic: str, lines: Iterator[bytes]) -> tuple[int, float]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)], operation_timeout=30).values():
        future.result()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "enable.idempotence": True, "compression.type": "lz4"})
    started = time.perf_counter()
    count = 0
    for line in lines:
        while True:
            try:
                producer.produce(topic, line)
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
    if producer.flush(120) != 0:
        raise RuntimeError("records left undelivered")
    return count, time.perf_counter() - started


@dataclass(frozen=True)
class Timing:
    wall_s: float  # from the assignment
    cpu_s: float
    flow_s: float  # wall, from the first records in hand (the broker's first-fetch wait left out)


class _Stopwatch:
    """Wall and CPU clocks of this process (every thread), started at a partition assignment, and a
    second wall clock started when the first records are in hand (`first_records`)."""

    def __init__(self) -> None:
        self.wall: float | None = None
        self.cpu: float | None = None
        self.flow: float | None = None

    def start(self) -> None:
        if self.wall is None:
            self.wall, self.cpu = time.perf_counter(), time.process_time()

    def first_records(self) -> None:
        if self.flow is None:
            self.flow = time.perf_counter()

    def stop(self) -> Timing:
        if self.wall is None or self.cpu is None or self.flow is None:
            raise RuntimeError("no partition was ever assigned, or no record read")
        now = time.perf_counter()
        return Timing(now - self.wall, time.process_time() - self.cpu, now - self.flow)


@dataclass
class _TimedHealth(Health):
    """The pipeline's own health record, starting the stopwatch when the first partition is assigned."""

    stopwatch: _Stopwatch = field(default_factory=_Stopwatch)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "assigned" and value:
            self.stopwatch.start()
        super().__setattr__(name, value)


def raw_consumer(bootstrap: str, topic: str, n: int) -> Timing:
    """From assignment to the N-th record, doing nothing with the records."""
    stopwatch = _Stopwatch()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic], on_assign=lambda c, parts: stopwatch.start())
    seen = 0
    deadline = time.monotonic() + 300
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw consumer saw {seen} of {n} records")
            messages = consumer.consume(500, 0.5)
            if messages:
                stopwatch.first_records()
            for message in messages:
                if message.error() is None:
                    seen += 1
        return stopwatch.stop()
    finally:
        consumer.close()


@dataclass(frozen=True)
class Reader:
    """One configuration of the consumer: its name in the report and its `logstream run` flags."""

    name: str
    flags: tuple[str, ...]


def readers(model: Path) -> list[Reader]:
    return [Reader("null", ("--detector", "null")),
            Reader("null/all", ("--detector", "null", "--emit", "all")),
            Reader("novelty", ("--detector", "novelty", "--model", str(model)))]


def fit_novelty(workload: Workload, into: Path) -> Path:
    """A novelty model of the workload's sample (its lines labelled normal), as `logstream novelty fit` writes."""
    path = into / f"novelty-{workload.name}.json"
    parser = LineParser(workload.format)
    NoveltyDetector.fit(iter_log_lines(workload.path, parser), source=str(workload.path)).save(path)
    return path


def logstream_settings(bootstrap: str, topic: str, workload: Workload, reader: Reader) -> Settings:
    """What `logstream run --once <workload flags> <reader flags>` would build from its flags."""
    run_id = uuid.uuid4().hex[:8]
    argv = ["run", "--bootstrap-servers", bootstrap, "--input-topic", topic,
            "--alerts-topic", f"{topic}.alerts.{run_id}", "--dlq-topic", f"{topic}.dlq.{run_id}",
            "--group-id", f"bench-{run_id}", "--format", workload.format, *workload.flags, *reader.flags, "--once"]
    return settings_from(build_parser().parse_args(argv))


def logstream_run(
    bootstrap: str, topic: str, workload: Workload, reader: Reader, profile: Path | None
) -> tuple[Timing, dict[str, int]]:
    """From assignment to the return of `Pipeline.run()` under `--once`, and the run's output counts."""
    settings = logstream_settings(bootstrap, topic, workload, reader)
    health = _TimedHealth()
    pipeline = Pipeline(settings, load_detector(settings), metrics=Metrics(), health=health)
    handle = pipeline.ingest.handle

    def timed_handle(*args: Any) -> None:  # the poll loop hands each consumed batch here
        health.stopwatch.first_records()
        handle(*args)

    pipeline.ingest.handle = timed_handle  # type: ignore[method-assign]
    if profile is not None:
        from pyinstrument import Profiler  # noqa: PLC0415 - a dev tool, only for --profile

        profiler = Profiler(interval=0.0005)
        profiler.start()
        code = pipeline.run()
        profiler.stop()
        profile.mkdir(parents=True, exist_ok=True)
        name = f"logstream-{workload.name}-{reader.name.replace('/', '-')}"
        (profile / f"{name}.txt").write_text(profiler.output_text(show_all=False))
        (profile / f"{name}.html").write_text(profiler.output_html())
    else:
        code = pipeline.run()
    timing = health.stopwatch.stop()
    if code != 0:
        raise RuntimeError(f"logstream run exited {code}")
    del pipeline
    gc.collect()  # the stopped pipeline's Kafka clients go now, not at an arbitrary later point
    return timing, {"alerts": high_watermark(bootstrap, settings.alerts_topic),
                    "dlq": high_watermark(bootstrap, settings.dlq_topic)}


def high_watermark(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks"})
    try:
        return int(consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        consumer.close()


def pin(cpu: int) -> str:
    if cpu < 0 or not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


@dataclass
class Row:
    workload: Workload
    reader: Reader
    lines: int
    raw: list[Timing]  # the raw consumer's runs of the same rounds (shared by the workload's readers)
    ours: list[Timing] = field(default_factory=list)
    outputs: dict[str, int] = field(default_factory=dict)

    def rate(self, timings: list[Timing], clock: str, pick: str = "best") -> float:
        seconds = [getattr(t, clock) for t in timings]
        return self.lines / (min(seconds) if pick == "best" else statistics.median(seconds))

    def median_ratio(self, clock: str = "wall_s") -> float:
        return self.rate(self.ours, clock, "median") / self.rate(self.raw, clock, "median")


def measure(bootstrap: str, workload: Workload, chosen: list[Reader], lines: int, repeats: int,
            profile: Path | None) -> list[Row]:
    """Produce the workload once, then read it `repeats` rounds, each round every reader once, alternately."""
    topic = f"bench.{workload.name}.{uuid.uuid4().hex[:6]}"
    sent, produce_s = produce(bootstrap, topic, repeated_lines(workload, lines))
    print(f"[{workload.name}] produced {sent} lines of {workload.path.name} in {produce_s:.1f}s", flush=True)
    raw: list[Timing] = []
    rows = [Row(workload, reader, sent, raw) for reader in chosen]
    for i in range(repeats):
        raw.append(raw_consumer(bootstrap, topic, sent))
        print(f"[{workload.name}] round {i + 1}: raw {sent / raw[-1].wall_s:,.0f} lines/s "
              f"({sent / raw[-1].cpu_s:,.0f} per CPU-s; {sent / raw[-1].flow_s:,.0f} from the first records)",
              flush=True)
        for row in rows:
            timing, row.outputs = logstream_run(bootstrap, topic, workload, row.reader, None)
            row.ours.append(timing)
            print(f"[{workload.name}] round {i + 1}: logstream {row.reader.name:<8} "
                  f"{sent / timing.wall_s:,.0f} lines/s "
                  f"({sent / timing.cpu_s:,.0f} per CPU-s; {sent / timing.flow_s:,.0f} from the first records); "
                  f"{row.outputs['alerts']} alerts, "
                  f"{row.outputs['dlq']} dead letters", flush=True)
    if profile is not None:
        for row in rows:
            logstream_run(bootstrap, topic, workload, row.reader, profile)
        print(f"[{workload.name}] profiles in {profile}", flush=True)
    return rows


def report(rows: list[Row], repeats: int) -> None:
    print(f"\n{'workload':<9} {'reader':<9} {'lines':>8} {'raw lines/s':>12} {'logstream lines/s':>18} {'ratio':>6}   "
          f"{'raw /CPU-s':>11} {'logstream /CPU-s':>17} {'ratio':>6} {'alerts':>7}")
    for row in rows:
        raw_wall, our_wall = row.rate(row.raw, "wall_s"), row.rate(row.ours, "wall_s")
        raw_cpu, our_cpu = row.rate(row.raw, "cpu_s"), row.rate(row.ours, "cpu_s")
        print(f"{row.workload.name:<9} {row.reader.name:<9} {row.lines:>8} {raw_wall:>12,.0f} {our_wall:>18,.0f} "
              f"{our_wall / raw_wall:>6.2f}   {raw_cpu:>11,.0f} {our_cpu:>17,.0f} {our_cpu / raw_cpu:>6.2f} "
              f"{row.outputs['alerts']:>7}")
    medians = ", ".join(f"{row.workload.name} {row.reader.name} {row.median_ratio():.2f}" for row in rows)
    print(f"(best of {repeats} per column; wall-clock ratio of the medians: {medians})")
    print("\nsteady state: wall clock from the first records in hand (the broker's first-fetch wait, "
          "~0.1-0.2 s and most of the raw consumer's time at 200k lines, left out on both sides)")
    print(f"{'workload':<9} {'reader':<9} {'raw lines/s':>12} {'logstream lines/s':>18} {'ratio':>6}")
    for row in rows:
        raw_flow, our_flow = row.rate(row.raw, "flow_s"), row.rate(row.ours, "flow_s")
        print(f"{row.workload.name:<9} {row.reader.name:<9} {raw_flow:>12,.0f} {our_flow:>18,.0f} "
              f"{our_flow / raw_flow:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200_000, help="lines per workload")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each reader (best, median shown)")
    parser.add_argument("--workload", choices=["count", "session", "both"], default="both")
    parser.add_argument("--reader", action="append", choices=["null", "null/all", "novelty"], default=None,
                        help="logstream configurations to run (repeatable; default: all three)")
    parser.add_argument("--cpu", type=int, default=0, help="core for the readers (-1: do not pin)")
    parser.add_argument("--profile", type=Path, default=None, help="write pyinstrument profiles here")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data directory (BGL/, HDFS/)")
    args = parser.parse_args(argv)
    known = workloads(args.data)
    chosen = [known[w] for w in (["count", "session"] if args.workload == "both" else [args.workload])]
    missing = [str(w.path) for w in chosen if not w.path.is_file()]
    if missing:
        print(f"missing data file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    names = set(args.reader or ["null", "null/all", "novelty"])
    configure_logging("WARNING")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="logstream-bench-") as data_dir, \
            EmbeddedBroker(data_dir=Path(data_dir)) as broker:
        placement = pin(args.cpu)  # after the broker started: the broker keeps every core
        print(f"broker {broker.bootstrap_servers}; readers {placement}; {os.cpu_count()} CPUs; "
              f"{args.lines} lines per workload, {args.repeats} runs each; logstream from {REPO}", flush=True)
        rows = []
        for workload in chosen:
            wanted = [r for r in readers(fit_novelty(workload, Path(data_dir))) if r.name in names]
            rows += measure(broker.bootstrap_servers, workload, wanted, args.lines, args.repeats, args.profile)
    report(rows, args.repeats)
    print(f"total {time.monotonic() - started:.0f}s; goals (null, default --emit, one core): "
          "count >= 0.5 x raw, session >= 0.3 x raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
