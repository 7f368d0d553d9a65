"""Data-parallel training under torch's standard launcher (`torchrun`), one process per GPU.

`torchrun --nproc_per_node N --no-python logstream-train fit ...` starts N copies of the command
with RANK / WORLD_SIZE / LOCAL_RANK set. Every process holds the whole model (LoRA training keeps
it small enough: QLoRA fits an 8B LLM per GPU) and builds the same split and stream from the same
seed. Each optimizer step's micro-batches are dealt out round-robin over the processes; their
gradients are summed with one all-reduce before the step, so every process applies the same update
to the same weights. The schedule (data order, steps, decays) is the single-process one: N
processes compute what one process computes, N times faster, whatever N was when the run started.

Rank 0 alone writes (run.json, checkpoints, the artifact, the report, stdout) and the others wait
at a barrier, so `--output` must be a directory every process sees (always true on one node).
Without torchrun (`WORLD_SIZE` unset) this is a world of one and every call is free.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class WorldError(RuntimeError):
    """The launcher's environment is inconsistent, or another process of the run failed."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank among `size` processes, GPU index on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> World:
        """The world torchrun describes in the environment; a world of one without it."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise WorldError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers: {exc}") from exc
        if size < 1 or not 0 <= rank < size or local_rank < 0:
            raise WorldError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={size}, "
                             f"LOCAL_RANK={local_rank}")
        return cls(rank=rank, size=size, local_rank=local_rank)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL between GPUs, gloo on CPU (tests, or CPU-only clusters)."""
        if self.distributed and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    rank=self.rank, world_size=self.size)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, requested: str | None) -> str | None:
        """Each process's GPU: `cuda:LOCAL_RANK` when CUDA is asked for (or there by default) in a world of many."""
        if not self.distributed:
            return requested
        wants_cuda = requested is None or requested.startswith("cuda")
        if wants_cuda and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested if requested is not None else "cpu"

    # --- collectives ------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 and hand its result to every rank; its error, raised on rank 0, fails all."""
        if not self.distributed:
            return action()
        box: list[Any] = [None]
        error: Exception | None = None
        if self.main:
            try:
                box[0] = ("ok", action())
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others were told
                error = exc
                box[0] = ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "error":
            raise WorldError(f"rank 0 failed: {value}")
        return value  # type: ignore[no-any-return]

    def gather(self, item: T) -> list[T]:
        """Every rank's `item`, in rank order, on every rank."""
        if not self.distributed:
            return [item]
        items: list[Any] = [None] * self.size
        dist.all_gather_object(items, item)
        return items

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `parameters` over all ranks, in one flat all-reduce per dtype and device.

        A rank that had no micro-batch this step takes part with zeros, so every rank ends with the
        same gradients (the sum the single-process run accumulates).
        """
        if not self.distributed:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            groups.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter)
        for group in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for parameter in group:
                grad = parameter.grad
                assert grad is not None
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
