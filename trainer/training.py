"""What the fit commands share: the run store (run.json and checkpoints), the progress bar, CPU threads.

A training run lives in `OUTPUT/checkpoints/`: `run.json` names the run (an id) and keeps the
settings that decide what it computes, so `--resume` can refuse a run started with other settings;
each stage writes one checkpoint file there, replaced atomically, so a kill at any moment leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import torch

from logstream.atomicfile import atomic_path, write_atomic
from logstream.logs import get_logger

log = get_logger(__name__)

RUN_FILE = "run.json"


class RunError(ValueError):
    """A training run cannot start or continue as asked; the message says why (the commands exit 2)."""


class RunStore:
    """OUTPUT/checkpoints: run.json (settings and run id), one `<name>.pt` per stage, JSON side files."""

    def __init__(self, directory: Path, error: type[RunError] = RunError) -> None:
        self.directory = directory
        self.error = error  # the command's own subclass, so its callers catch one type

    def begin(self, config: dict[str, Any], *, resume: bool) -> str:
        """The run id: a new run (refused over an existing one without --resume) or the resumed one."""
        path = self.directory / RUN_FILE
        if path.is_file():
            saved = orjson.loads(path.read_bytes())
            if not resume:
                raise self.error(f"{self.directory.parent} holds a training run already; pass --resume to continue "
                                 "it, or choose another --output")
            differ = sorted(k for k in set(config) | set(saved["config"]) if config.get(k) != saved["config"].get(k))
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

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.pt"

    def save(self, name: str, payload: dict[str, Any]) -> None:
        """Write a checkpoint beside its target and swap it in (a kill never leaves half a file)."""
        path = self.path(name)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        log.info("checkpoint_saved", stage=name, step=payload.get("step"), path=str(path))

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
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
