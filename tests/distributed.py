"""Launch a function on N gloo ranks for CPU multi-process tests, and collect what each rank wrote."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

PRELOAD = [
    "torch",
    "transformers",
    "trl",
    "trl.trainer.utils",
    "trl_longpo",
    "trl_longpo.tiny",
    "trl_longpo.sequence_parallel",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int) -> None:
    """torchrun-style environment (accelerate reads it too) and a gloo process group; 1 thread per rank."""
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        ACCELERATE_USE_CPU="true",
    )
    torch.set_num_threads(1)  # the machine has 2 cores shared by up to 4 ranks
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=90))


def write_result(outdir: str, rank: int, result: dict) -> None:
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(result))


def launch(
    worker: Callable,
    world_size: int,
    outdir: Path,
    args: tuple = (),
    timeout: float = 240.0,
    preload: list[str] | None = None,
) -> list[dict]:
    """Run `worker(rank, world_size, port, outdir, *args)` on `world_size` processes; return each rank's JSON result.

    forkserver with preloaded imports: torch/transformers are imported once by the fork server instead of once per
    rank (that import dominates these tests on a 2-core machine), and ranks still start from a clean process.
    """
    import torch.multiprocessing as mp

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.set_forkserver_preload([*PRELOAD, *(preload or []), worker.__module__])
    context = mp.start_processes(
        worker, args=(world_size, free_port(), str(outdir), *args), nprocs=world_size, join=False, start_method=method
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world_size}-rank run did not finish in {timeout:.0f}s")
    return [json.loads(Path(outdir, f"rank{r}.json").read_text()) for r in range(world_size)]
