"""Chaos harness: SIGKILL `logstream run` at random moments and verify that no window is lost or doubled.

For each delivery mode: produce N real log lines (at a steady rate, so the consumer is always
mid-stream), run `logstream run --emit all` as a subprocess and kill it with SIGKILL K times at random
moments, restarting it each time with the same static group member id (as a Kubernetes pod would),
then drain with a final `--once` run. A verifier reads the alerts topic (read_committed) and compares
the alert ids with an uninterrupted reference run over the same topic:

    windows expected, windows seen, lost, duplicated, unexpected

Exactly-once must show 0 lost, 0 duplicated; at-least-once 0 lost (duplicates carry the same
`alert_id`, so downstream can drop them). "unexpected" counts windows the reference run never made
(fragments of a badly rebuilt window): it must be 0 in both modes.

    python bench/chaos.py --lines 100000 --kills 20            # both modes, count windows (BGL)
    python bench/chaos.py --window session --lines 50000       # session windows (HDFS)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from logstream.broker import EmbeddedBroker  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SOURCES = {
    "count": ("bgl", SHARED / "BGL" / "BGL_train_sample.log", ROOT / "logstream" / "samples" / "BGL_2k.log"),
    "session": ("hdfs", SHARED / "HDFS" / "HDFS_train_sample.log", ROOT / "logstream" / "samples" / "HDFS_2k.log"),
}


@dataclass
class ChaosResult:
    mode: str
    expected: int
    seen: int
    lost: int
    duplicated: int
    unexpected: int
    kills: int
    seconds: float

    def line(self) -> str:
        return (f"{self.mode:14} windows expected {self.expected:6}  seen {self.seen:6}  lost {self.lost:4}  "
                f"duplicated {self.duplicated:4}  unexpected {self.unexpected:4}  ({self.kills} kills, "
                f"{self.seconds:.0f}s)")


def read_lines(window: str, count: int) -> list[bytes]:
    _, path, fallback = SOURCES[window]
    source = path if path.exists() else fallback
    with source.open("rb") as handle:
        lines = [raw.rstrip(b"\r\n") for raw in handle if raw.strip()]
    return list(islice(cycle(lines), count))


def produce(bootstrap: str, topic: str, lines: list[bytes], rate: float, partitions: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 10})
    started = time.monotonic()
    for i, value in enumerate(lines):
        while True:
            try:
                producer.produce(topic, value, partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
        if rate > 0 and i % 200 == 0:
            producer.poll(0)
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    if producer.flush(60):
        raise RuntimeError("lines left undelivered")


def alert_ids(bootstrap: str, topic: str) -> Counter[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"verify-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "enable.partition.eof": True})
    partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    ids: Counter[str] = Counter()
    ended: set[int] = set()
    idle_since = time.monotonic()
    while len(ended) < len(partitions) or time.monotonic() - idle_since < 1.0:
        message = consumer.poll(0.2)
        if message is None:
            if time.monotonic() - idle_since > 30:
                break
            continue
        if message.error():
            if message.error().code() == -191:
                ended.add(message.partition())
            continue
        ended.discard(message.partition())
        idle_since = time.monotonic()
        ids[orjson.loads(message.value())["alert_id"]] += 1
    consumer.close()
    return ids


def logstream_command(bootstrap: str, topic: str, group: str, alerts: str, fmt: str, window: str, mode: str,
                      *extra: str) -> list[str]:
    command = [sys.executable, "-m", "logstream.cli", "run", "--bootstrap-servers", bootstrap, "--input-topic", topic,
               "--alerts-topic", alerts, "--dlq-topic", f"{alerts}.dlq", "--group-id", group, "--format", fmt,
               "--window", window, "--detector", "null", "--emit", "all", "--guarantee", mode,
               "--commit-interval-s", "0.5", "--max-poll-interval-ms", "10000", "--session-timeout-ms", "6000",
               *extra]
    if window == "session":
        command += ["--session-gap", "600", "--session-max-open", "300"]
    return command


def run_mode(bootstrap: str, mode: str, *, lines: list[bytes], window: str, kills: int, partitions: int,
             rate: float, seed: int, log_dir: Path) -> ChaosResult:
    fmt = SOURCES[window][0]
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    topic, group = f"chaos-{mode}-{tag}", f"chaos-{mode}-{tag}.group"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30).values():
        future.result()
    started = time.monotonic()
    feeder = threading.Thread(target=produce, args=(bootstrap, topic, lines, rate, partitions), daemon=True)
    feeder.start()

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = logstream_command(bootstrap, topic, group, f"{topic}.alerts", fmt, window, mode,
                                "--group-instance-id", "chaos-member")
    log = (log_dir / f"{mode}.log").open("ab")
    done_kills = 0
    while done_kills < kills:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        time.sleep(rng.uniform(1.0, 3.5))  # start-up takes ~1 s, so most kills land mid-stream
        if process.poll() is not None:
            raise RuntimeError(f"logstream exited early with {process.returncode}; see {log.name}")
        process.send_signal(signal.SIGKILL)
        process.wait()
        done_kills += 1
    feeder.join()
    final = subprocess.run([*command, "--once"], stdout=log, stderr=log, env=env, timeout=900)
    if final.returncode != 0:
        raise RuntimeError(f"final --once run failed ({final.returncode}); see {log.name}")
    seen = alert_ids(bootstrap, f"{topic}.alerts")
    elapsed = time.monotonic() - started

    reference = subprocess.run(
        [*logstream_command(bootstrap, topic, f"{group}.reference", f"{topic}.reference", fmt, window, mode), "--once"],
        stdout=log, stderr=log, env=env, timeout=900,
    )
    if reference.returncode != 0:
        raise RuntimeError(f"reference run failed; see {log.name}")
    expected = alert_ids(bootstrap, f"{topic}.reference")
    return ChaosResult(
        mode=mode,
        expected=len(expected),
        seen=len(seen),
        lost=len(set(expected) - set(seen)),
        duplicated=sum(count - 1 for count in seen.values()),
        unexpected=len(set(seen) - set(expected)),
        kills=done_kills,
        seconds=elapsed,
    )


def run_chaos(*, lines: int, kills: int, modes: list[str], window: str = "count", partitions: int = 2,
              rate: float = 0.0, seed: int = 7, bootstrap: str | None = None,
              log_dir: Path | None = None) -> list[ChaosResult]:
    """Run the harness for each mode; starts its own embedded broker unless `bootstrap` is given."""
    data = read_lines(window, lines)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="logstream-chaos-"))
    rate = rate or max(2000.0, lines / max(kills * 2.0, 1.0))
    broker = None if bootstrap else EmbeddedBroker().start()
    try:
        address = bootstrap or broker.bootstrap_servers  # type: ignore[union-attr]
        return [run_mode(address, mode, lines=data, window=window, kills=kills, partitions=partitions, rate=rate,
                         seed=seed + i, log_dir=log_dir) for i, mode in enumerate(modes)]
    finally:
        if broker is not None:
            broker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["exactly-once", "at-least-once"],
                        choices=["exactly-once", "at-least-once"])
    parser.add_argument("--window", choices=["count", "session"], default="count")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.0, help="lines/s produced (default: spread over the kills)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bootstrap-servers", default=None, help="use this broker instead of an embedded one")
    args = parser.parse_args()
    results = run_chaos(lines=args.lines, kills=args.kills, modes=args.modes, window=args.window,
                        partitions=args.partitions, rate=args.rate, seed=args.seed, bootstrap=args.bootstrap_servers)
    print(f"chaos: {args.lines} lines, {args.window} windows, {args.partitions} partitions, {args.kills} SIGKILLs "
          "per mode")
    for result in results:
        print(result.line())
    ok = all(r.lost == 0 and r.unexpected == 0 and (r.mode != "exactly-once" or r.duplicated == 0) for r in results)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
