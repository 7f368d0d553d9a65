"""trainer.distributed: the launcher's environment, and the collectives on a real two-process gloo group."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer.distributed import World, WorldError


def test_without_a_launcher_it_is_a_world_of_one() -> None:
    world = World.from_env({})
    assert (world.rank, world.size, world.main, world.distributed) == (0, 1, True, False)
    assert world.device(None) is None and world.device("cpu") == "cpu"
    assert world.gather("x") == ["x"] and world.on_main(lambda: 7) == 7


def test_torchrun_variables_are_read_and_checked() -> None:
    world = World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.main) == (3, 4, 1, False)
    if not torch.cuda.is_available():
        assert world.device(None) == "cpu" and world.device("cpu") == "cpu"
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "two"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(WorldError):
            World.from_env(bad)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = World(rank=rank, size=2, local_rank=rank)
    world.start(torch.device("cpu"))
    try:
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2, 2))
        a.grad = torch.full((3,), float(rank + 1))
        if rank == 0:  # rank 1 had no micro-batch touching b this step
            b.grad = torch.ones(2, 2)
        world.sum_gradients([a, b])
        gathered = world.gather((rank, [rank] * rank))
        shared = world.on_main(lambda: "from rank 0")
        try:
            world.on_main(lambda: 1 / 0)
            failure = "none"
        except ZeroDivisionError:
            failure = "own error"
        except WorldError as exc:
            failure = f"told: {exc}"
        assert b.grad is not None
        torch.save({"a": a.grad, "b": b.grad, "gathered": gathered, "shared": shared, "failure": failure},
                   f"{out}/rank{rank}.pt")
    finally:
        world.close()


def test_gradients_are_summed_and_rank_zero_decides_on_a_real_process_group(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for result in results:
        assert torch.equal(result["a"], torch.full((3,), 3.0))  # 1 + 2
        assert torch.equal(result["b"], torch.ones(2, 2))  # rank 1 took part with zeros
        assert result["gathered"] == [(0, []), (1, [1])]
        assert result["shared"] == "from rank 0"
    assert results[0]["failure"] == "own error"
    assert results[1]["failure"].startswith("told: rank 0 failed: ZeroDivisionError")
