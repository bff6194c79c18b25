"""The process group: who am I (rank), how many are we (world size), and the few collectives
the trainer needs outside the model (barrier, mean of a scalar, broadcast of a small object).

Under ``torchrun --nproc_per_node=N`` the launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` reads them (``env://``) and starts
NCCL on CUDA or gloo on CPU, one GPU per process (``cuda:LOCAL_RANK``). Under plain ``python``
with ``dist.strategy`` ddp/fsdp2 it starts a world of one (an in-memory store), so the same
entry point and the same code path run with one process. ``dist.strategy = none`` needs no
process group; under torchrun with more than one process it is an error (every rank would train
its own copy of the model).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hgf.config import Config
from hgf.errors import HGFError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1


def world() -> World:
    """This process's rank and the number of processes (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main_process() -> bool:
    return world().rank == 0


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise HGFError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@contextlib.contextmanager
def process_group(cfg: Config, device: torch.device) -> Iterator[torch.device]:
    """Start the process group ``cfg.dist.strategy`` needs (if none is running yet) and yield
    this process's device; the group is destroyed on exit if this call started it."""
    n, strategy = launched_world_size(), cfg.dist.strategy
    if n > 1 and strategy == "none":
        raise HGFError(f"launched with {n} processes (WORLD_SIZE={n}) but dist.strategy=none; "
                       "set --dist.strategy=ddp or --dist.strategy=fsdp2")
    if strategy == "none" or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device_id)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device_id)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks (``x`` itself in a world of one)."""
    if not _distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (gloo has no AVG: the sum divided by N)."""
    return all_sum(x) / world().world_size if _distributed() else x


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
