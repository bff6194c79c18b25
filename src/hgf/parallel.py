"""Where parallelism is applied to a single-device model, from outside (STYLE.md §1).

The trainer calls :func:`parallelize` once after building the model and guards file writes and
logging with :func:`is_main_process`. This module is the single-process implementation
(``dist.strategy = "none"``): the identity wrapper, rank 0 of a world of 1. DDP/FSDP2 plug in
here without touching the model or the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hgf.config import Config
from hgf.errors import HGFError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1


def world() -> World:
    """This process's rank and the number of processes (1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return World()


def is_main_process() -> bool:
    return world().rank == 0


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """Wrap ``model`` for ``cfg.dist.strategy``; ``none`` returns it unchanged."""
    if cfg.dist.strategy != "none":
        raise HGFError(f"dist.strategy={cfg.dist.strategy!r} is not available in this build "
                       "(only 'none')")
    return model
