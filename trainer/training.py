"""What the fit commands share: one skeleton, the stage table row, the run store, the progress bar, CPU threads.

Every fit command follows `fit_skeleton`: prepare (dump -> windows -> what the stages learn from)
-> the stages asked for (done ones skipped, an interrupted one resumed) -> finish (publish the
artifact the consumer serves) -> evaluate -> `OUTPUT/fit-summary.json`. Each model lists its stages
in one table of `Stage` rows (`fit_logllm.STAGE_TABLE`, `fit_logllama.STAGE_TABLE`).

A training run lives in `OUTPUT/checkpoints/`: `run.json` names the run (an id) and keeps the
settings that decide what it computes, so `--resume` can refuse a run started with other settings;
each stage writes one checkpoint file there (`stage-<name>.pt`), replaced atomically, so a kill at
any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
import torch

from logstream.atomicfile import atomic_path, write_atomic
from logstream.logs import get_logger

log = get_logger(__name__)

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints: the run store
SUMMARY_FILE = "fit-summary.json"  # OUTPUT/fit-summary.json: what the run did, written last

Data = TypeVar("Data")


@dataclass(frozen=True, slots=True)
class Stage:
    """One row of a model's stage table: what the stage trains, its defaults, and how it learns."""

    name: str  # as given to --stages and in checkpoint names
    trains: Mapping[str, bool]  # the model's parts, and whether this stage updates each
    lr: float  # default learning rate (each command's flag overrides it)
    epochs: int  # default epochs
    mode: str  # how it learns, in a few words (objective, data, what runs frozen)


class FitRun(Protocol[Data]):
    """A fit command's trainer as `fit_skeleton` drives it."""

    summary: dict[str, Any]

    def prepare(self) -> Data:
        """The dump's windows and everything the stages learn from (the test split kept apart)."""

    def run(self, stages: Sequence[str], data: Data) -> None:
        """The stages asked for, in table order: done ones skipped, an interrupted one resumed."""

    def finish(self, data: Data) -> None:
        """Publish the artifact the consumer serves (which stage's model, with which decision rule)."""


def fit_skeleton(trainer: FitRun[Data], stages: Sequence[str], output: Path,
                 evaluate: Callable[[Data], dict[str, Any] | None] | None) -> dict[str, Any]:
    """prepare -> stages -> finish -> evaluate -> summary (`OUTPUT/fit-summary.json`, written when
    `evaluate` is given: the main process of a distributed run).

    The summary's `train_seconds` covers the stages and the artifact of this invocation (a resumed
    run counts only what it did), `wall_seconds` the whole of it from reading the data to the
    evaluation, and `peak_rss_mb` this process's peak resident memory in MiB (`getrusage`).
    """
    began = time.perf_counter()
    data = trainer.prepare()
    started = time.perf_counter()
    trainer.run(stages, data)
    trainer.finish(data)
    trainer.summary["train_seconds"] = round(time.perf_counter() - started, 1)
    if evaluate is not None:
        trainer.summary["evaluation"] = evaluate(data)
    trainer.summary["wall_seconds"] = round(time.perf_counter() - began, 1)
    trainer.summary["peak_rss_mb"] = peak_rss_mb()
    if evaluate is not None:
        write_atomic(output / SUMMARY_FILE, orjson.dumps(trainer.summary, option=orjson.OPT_INDENT_2))
    return trainer.summary


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class RunError(ValueError):
    """A training run cannot start or continue as asked; the message says why (the commands exit 2)."""


class RunStore:
    """OUTPUT/checkpoints: run.json (settings and run id), one `stage-<name>.pt` per stage, JSON side files."""

    def __init__(self, directory: Path, error: type[RunError] = RunError) -> None:
        self.directory = directory
        self.error = error  # the command's own subclass, so its callers catch one type

    def begin(self, run_config: Any, *, resume: bool,
              upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> str:
        """The run id: a new run (refused over an existing one without --resume) or the resumed one.

        `run_config` is the command's config dataclass; run.json keeps its fields. A saved run.json
        without a field that has a default (a setting added after that run started) ran with that
        default, so a resume with the default matches it; `upgrade` translates a saved config of an
        older logstream (a renamed setting) before the comparison.
        """
        config = dataclasses.asdict(run_config)
        path = self.directory / RUN_FILE
        if path.is_file():
            saved = orjson.loads(path.read_bytes())
            if not resume:
                raise self.error(f"{self.directory.parent} holds a training run already; pass --resume to continue "
                                 "it, or choose another --output")
            defaults = {f.name: f.default for f in dataclasses.fields(run_config)
                        if f.default is not dataclasses.MISSING}
            before = {**defaults, **(upgrade(saved["config"]) if upgrade else saved["config"])}
            differ = sorted(k for k in set(config) | set(before) if config.get(k) != before.get(k))
            if differ:
                raise self.error("--resume with other settings than the run in "
                                 f"{self.directory.parent}: {', '.join(differ)} differ")
            log.info("fit_resumed", run_id=saved["run_id"], output=str(self.directory.parent))
            return str(saved["run_id"])
        if resume:
            raise self.error(f"nothing to resume in {self.directory.parent} (no {self.directory.name}/{RUN_FILE})")
        run_id = uuid.uuid4().hex[:16]
        self.write_json(RUN_FILE, {"run_id": run_id, "config": config, "started_at": time.time()})
        return run_id

    def path(self, stage: str) -> Path:
        """The checkpoint of stage `stage` (one naming for every fit command)."""
        return self.directory / f"stage-{stage}.pt"

    def save(self, stage: str, payload: dict[str, Any]) -> None:
        """Write a stage's checkpoint beside its target and swap it in (a kill never leaves half a file)."""
        path = self.path(stage)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        log.info("checkpoint_saved", stage=stage, step=payload.get("step"), path=str(path))

    def load(self, stage: str) -> dict[str, Any] | None:
        path = self.path(stage)
        return torch.load(path, weights_only=True) if path.is_file() else None

    def write_json(self, name: str, body: dict[str, Any]) -> None:
        write_atomic(self.directory / name, orjson.dumps(body, option=orjson.OPT_INDENT_2))


def progress_bar(total: int, initial: int, desc: str, unit: str = "step", *, shown: bool = True) -> Any:
    """A tqdm bar on stderr (hidden when stderr is not a terminal, or `shown` is false), resumed at `initial`."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=None if shown else True,
                dynamic_ncols=True)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` torch CPU threads (None: torch's choice), then put the caller's setting back.

    On a shared CPU one thread is often fastest: threads that wait on busy cores stall every matmul.
    """
    if threads is not None and threads < 1:
        raise RunError("--threads must be at least 1")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # callers in the same process (tests) keep their setting


def recent_mean(values: Sequence[float], n: int = 50) -> float:
    """Mean of the last `n` values (the smoothed loss a progress bar shows)."""
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


def mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 5) if values else float("nan")
