"""The `logstream` command: a map from subcommand to a plain function.

`run` flags are generated from `Settings`, so every flag is also a LOGSTREAM_* environment variable
and there is one list of options, not two.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from logstream import __version__
from logstream.argparsing import DefaultsHelpFormatter, OneLineErrorParser, unreadable_file
from logstream.cliargs import add_settings_arguments, settings_from, settings_problem, start_logging
from logstream.errors import KafkaSetupError
from logstream.logs import get_logger
from logstream.settings import Settings, kafka_name_problem

log = get_logger("logstream.cli")

Command = Callable[[argparse.Namespace], int]


# --- commands ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from logstream.detectors.base import DetectorNotReady
    from logstream.detectors.registry import load_detector
    from logstream.kafka import base_config, check_client_configs, wait_for_broker
    from logstream.metrics import Health, Metrics, MetricsServer, MetricsServerError
    from logstream.pipeline import Pipeline

    settings = settings_from(args)
    start_logging(settings.log_level)
    if not settings.input_topic:
        print("logstream run: at least one --input-topic is required", file=sys.stderr)
        return 2
    check_client_configs(settings)  # a refused --kafka-option: one line and exit 2 (KafkaConfigError: main)
    # The endpoint comes up before the detector loads (minutes for a large model on CPU): /healthz
    # answers meanwhile, so a liveness probe does not kill a loading process; /readyz says 503.
    metrics, health = Metrics(), Health()
    server = None
    if settings.metrics_port is not None:
        try:
            server = MetricsServer(metrics, health, settings.metrics_port).start()
        except MetricsServerError as exc:  # a port clash is a configuration error, not a crash
            print(f"logstream run: {exc}", file=sys.stderr)
            return 2
    try:
        # A wrong address fails in seconds, not after a large model has loaded (KafkaSetupError: main);
        # a missing --detector is a usage error, said at once.
        if settings.detector is not None:
            wait_for_broker(base_config(settings), settings.connect_timeout_s)
        try:
            detector = load_detector(settings)
        except DetectorNotReady as exc:
            print(f"logstream run: {exc}", file=sys.stderr)
            return 2
        stop = threading.Event()
        _stop_on_signals(stop)
        pipeline = Pipeline(settings, detector, metrics=metrics, health=health, stop_event=stop)
        code = pipeline.run()
        if pipeline.failure is not None:  # fenced or broken for good: the one line after the JSON logs
            print(f"logstream run: {pipeline.failure}", file=sys.stderr)
        return code
    finally:
        if server is not None:
            server.stop()


def _connect_timeout(args: argparse.Namespace) -> float:
    """--connect-timeout-s, else LOGSTREAM_CONNECT_TIMEOUT_S, else the Settings default."""
    given = getattr(args, "connect_timeout_s", None)
    return float(given) if given is not None else Settings().connect_timeout_s


def _add_connect_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect-timeout-s", type=float, default=None,
                        help="seconds to reach a bootstrap server before exiting 1 [default: "
                        f"{Settings.model_fields['connect_timeout_s'].default:g}; env LOGSTREAM_CONNECT_TIMEOUT_S]")


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_broker(args: argparse.Namespace) -> int:
    from logstream.basemodels import CacheDirError, writable_cache_dir
    from logstream.broker import EmbeddedBroker

    start_logging("INFO")
    try:
        data_dir = writable_cache_dir(args.data_dir or (Settings().cache_dir / "broker"))
    except CacheDirError as exc:
        print(f"logstream broker: {exc}", file=sys.stderr)
        return 2
    broker = EmbeddedBroker(data_dir=data_dir, port=args.port, host=args.host).start()
    print(broker.bootstrap_servers, flush=True)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        while broker.running and not stop.wait(0.5):
            pass
    finally:
        broker.close()
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    from logstream.kafka import client_config, wait_for_broker
    from logstream.producer import produce_file

    start_logging("INFO")
    if (problem := unreadable_file(args.file)) is not None:
        print(f"logstream produce: --file {problem}", file=sys.stderr)
        return 2
    if (problem := kafka_name_problem(args.topic)) is not None:
        print(f"logstream produce: --topic {args.topic!r} {problem}", file=sys.stderr)
        return 2
    wait_for_broker(client_config(args.bootstrap_servers), _connect_timeout(args))
    try:
        sent = produce_file(
            bootstrap_servers=args.bootstrap_servers, topic=args.topic, path=args.file, partitions=args.partitions,
            key=args.key, rate=args.rate, limit=args.limit,
        )
    except (KafkaException, RuntimeError) as exc:  # the broker went away mid-stream: undelivered records
        print(f"logstream produce: writing {args.topic} on {args.bootstrap_servers} failed: {exc}", file=sys.stderr)
        return 1
    print(f"produced {sent} records to {args.topic}", file=sys.stderr)
    return 0


def _tail(args: argparse.Namespace, command: str, noun: str, tail: Callable[..., int], **options: Any) -> int:
    """Follow a topic with `tail` (alerts or dead letters) until stopped or idle; a topic of other records is
    one line and exit 2."""
    from logstream.tail import WrongTopic

    start_logging("WARNING")
    if (problem := kafka_name_problem(args.topic)) is not None:
        print(f"logstream {command}: --topic {args.topic!r} {problem}", file=sys.stderr)
        return 2
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        seen = tail(args.bootstrap_servers, args.topic, stop=stop, from_beginning=args.from_beginning,
                    raw_json=args.json, idle_exit_s=args.idle_exit, connect_timeout_s=_connect_timeout(args), **options)
    except WrongTopic as exc:
        print(f"logstream {command}: {exc}", file=sys.stderr)
        return 2
    print(f"{seen} {noun}", file=sys.stderr)
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from logstream.tail import tail_alerts

    return _tail(args, "alerts", "alerts", tail_alerts)


def cmd_dlq(args: argparse.Namespace) -> int:
    from logstream.tail import tail_dead_letters

    return _tail(args, "dlq", "dead letters", tail_dead_letters, max_bytes=args.max_bytes)


def cmd_novelty_fit(args: argparse.Namespace) -> int:
    from collections import Counter

    from logstream.detectors.novelty import NoveltyDetector
    from logstream.files import iter_log_lines
    from logstream.parsing import LineParser

    start_logging("INFO")
    for path in args.input:
        if (problem := unreadable_file(path)) is not None:
            print(f"logstream novelty fit: --input {problem}", file=sys.stderr)
            return 2
    parser = LineParser(args.format)
    bad: Counter[str] = Counter()

    def lines() -> typing.Iterator[Any]:
        for path in args.input:
            for number, line in enumerate(iter_log_lines(path, parser, bad=bad)):
                if args.limit is not None and number >= args.limit:
                    break
                yield line

    try:
        detector = NoveltyDetector.fit(lines(), source=",".join(str(p) for p in args.input))
        detector.save(args.output)
    except (ValueError, OSError) as exc:  # no normal line in the input; an output path that cannot be written
        print(f"logstream novelty fit: {exc}", file=sys.stderr)
        return 2
    print(f"novelty model: {len(detector.known)} templates from {detector.lines} normal lines -> {args.output}"
          + (f" (skipped: {dict(bad)})" if bad else ""), file=sys.stderr)
    return 0


REPARTITION_FIELDS = (
    "bootstrap_servers", "input_topic", "repartition_topic", "group_id", "group_instance_id", "guarantee",
    "kafka_option", "create_topics", "topic_partitions", "topic_replication", "commit_interval_s", "once",
    "max_poll_interval_ms", "session_timeout_ms", "connect_timeout_s", "log_level",
)


def cmd_repartition(args: argparse.Namespace) -> int:
    from logstream.kafka import check_client_configs
    from logstream.repartition import Repartitioner

    settings = settings_from(args)
    start_logging(settings.log_level)
    if (problem := settings.repartition_problem()) is not None:
        print(f"logstream repartition: {problem}", file=sys.stderr)
        return 2
    check_client_configs(settings)
    stop = threading.Event()
    _stop_on_signals(stop)
    repartitioner = Repartitioner(settings, stop_event=stop)
    code = repartitioner.run()
    if repartitioner.failure is not None:
        print(f"logstream repartition: {repartitioner.failure}", file=sys.stderr)
    return code


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from logstream.basemodels import BaseModelError, resolve_embedder, resolve_llm

    settings = settings_from(args)
    start_logging(settings.log_level)
    try:
        bases = {"encoder": resolve_embedder(settings.embedder, settings.cache_dir),
                 "LLM": resolve_llm(settings.llm, settings.cache_dir)}
    except BaseModelError as exc:
        print(f"logstream models prepare: {exc}", file=sys.stderr)
        return 2
    for role, base in bases.items():
        print(f"{role} {base.ref}: {base.load_dir} (sha256 {base.sha256[:16]})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from logstream.demo import run_demo

    return run_demo(detector=args.detector, model=args.model, lines=args.lines, keep_broker=args.keep_broker,
                    dataset=args.dataset)


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="logstream", formatter_class=DefaultsHelpFormatter,
                                description="Streaming log anomaly detection between Kafka topics.")
    parser.add_argument("--version", action="version", version=f"logstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)

    run = command("run", "consume raw logs, window, score with --detector, publish alerts; every flag is also a "
                  "LOGSTREAM_* environment variable (a flag wins over the environment)")
    add_settings_arguments(run)
    run.set_defaults(func=cmd_run)

    broker = command("broker", "run the embedded Kafka-protocol broker in the foreground")
    broker.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on")
    broker.add_argument("--data-dir", type=Path, default=None, help="data directory (default: <cache>/broker)")
    broker.set_defaults(func=cmd_broker)

    produce = command("produce", "stream a log file into a topic, one record per line")
    produce.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]")
    produce.add_argument("--topic", required=True, help="topic to write (created if missing)")
    produce.add_argument("--file", type=Path, required=True, help="log file (.gz allowed)")
    produce.add_argument("--partitions", type=int, default=1, help="partitions when the topic is created")
    produce.add_argument("--key", choices=["none", "block"], default="none",
                         help="none, or block: each line to the partition of its block id (crc32), keyed by it; a "
                         "line naming blocks on several partitions goes to each (headers logstream.blocks, "
                         "logstream.copy-of), so every block's session gets all its lines once")
    produce.add_argument("--rate", type=float, default=0.0, help="lines per second (0: as fast as possible)")
    produce.add_argument("--limit", type=int, default=None, help="stop after this many lines")
    _add_connect_timeout(produce)
    produce.set_defaults(func=cmd_produce)

    def tail_command(name: str, help_text: str, topic: str, flag: str, json_help: str) -> argparse.ArgumentParser:
        tail = command(name, help_text)
        tail.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]")
        tail.add_argument("--topic", default=topic, help=f"the topic to read (`run {flag}`)")
        tail.add_argument("--from-beginning", action="store_true",
                          help="start at the oldest record the topic keeps (default: only new records)")
        tail.add_argument("--json", action="store_true", help=json_help)
        tail.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
        _add_connect_timeout(tail)
        return tail

    alerts = tail_command("alerts", "print alerts from the alerts topic as they arrive", "logstream.alerts",
                          "--alerts-topic", "print the raw JSON documents")
    alerts.set_defaults(func=cmd_alerts)
    dlq = tail_command("dlq", "print dead-letter records: reason, detail, source topic/partition/offset and the "
                       "original bytes", "logstream.dlq", "--dlq-topic",
                       "one JSON object per record (original bytes exact in original_base64)")
    dlq.add_argument("--max-bytes", type=int, default=300, help="original bytes shown per record (text output)")
    dlq.set_defaults(func=cmd_dlq)

    novelty = command("novelty", "the unseen-template detector").add_subparsers(dest="action", required=True,
                                                                                 metavar="ACTION")
    fit = novelty.add_parser("fit", help="learn the templates of normal traffic from log files",
                             formatter_class=DefaultsHelpFormatter)
    fit.add_argument("--format", required=True, choices=["hdfs", "bgl", "thunderbird", "liberty", "generic"],
                     help="line format of the files (as `run --format`)")
    fit.add_argument("--input", type=Path, action="append", required=True,
                     help="log file (repeatable, .gz ok)")
    fit.add_argument("--output", type=Path, required=True, help="model file to write (JSON)")
    fit.add_argument("--limit", type=int, default=None, help="use at most this many lines per file")
    fit.set_defaults(func=cmd_novelty_fit)

    repartition = command(
        "repartition", "re-key raw lines by block id into an internal topic (sessions across partitions)"
    )
    add_settings_arguments(repartition, only=REPARTITION_FIELDS)
    repartition.set_defaults(func=cmd_repartition)

    models = command("models", "base models of the LLM detectors").add_subparsers(dest="action", required=True,
                                                                                   metavar="ACTION")
    prepare = models.add_parser("prepare", help="convert the LLM's GGUF once into a cached safetensors directory "
                                "and hash both base models (setup runs it)", formatter_class=DefaultsHelpFormatter)
    add_settings_arguments(prepare, only=["embedder", "llm", "cache_dir", "log_level"])
    prepare.set_defaults(func=cmd_models_prepare)

    demo = command("demo", "embedded broker + real log sample + consumer, printing alerts")
    demo.add_argument("--detector", default="logllm", choices=["logllm", "novelty", "logllama"],
                      help="logllm has shipped BGL and HDFS models, novelty a BGL one; logllama needs --model")
    demo.add_argument("--dataset", default="bgl", choices=["bgl", "hdfs"],
                      help="sample to stream: BGL (count windows) or HDFS (block sessions, judged at the end)")
    demo.add_argument("--model", type=Path, default=None,
                      help="your own model for that dataset instead (`logstream-train fit` / `fit-logllama` artifact)")
    demo.add_argument("--lines", type=int, default=None, help="lines of the sample to stream (default: all of it)")
    demo.add_argument("--keep-broker", action="store_true", help="leave the broker running after the demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KafkaSetupError as exc:  # broker unreachable, input topic missing, no partitions: one line
        print(f"logstream {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValidationError, SettingsError) as exc:
        print(f"logstream {args.command}: invalid settings: {settings_problem(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
