"""Model and optimizer state of a (possibly sharded) model, for checkpoints and the final export.

* Sharded checkpoints: torch.distributed.checkpoint (DCP). Every rank writes its own shards of
  ``{"model": ..., "optim": ...}`` (keys are parameter names, ``get_state_dict``); loading
  reshards to whatever the reader is: N ranks of FSDP2, or one process with a plain model.
* Full state into a sharded model: a single-process checkpoint (whole tensors, optimizer state
  keyed by parameter index) is scattered to the shards (``set_state_dict``, full_state_dict).
* Export: the whole weights gathered to rank 0 on the CPU (``get_model_state_dict`` with
  full_state_dict and cpu_offload) and written as one safetensors file in the exact layout of
  :func:`hgf.runs.save_weights` (tied weights stored once), so ``hgf.runs.load_trained`` works in
  one process.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer

from hgf.parallel.apply import is_sharded
from hgf.parallel.env import is_main_process
from hgf.runs import atomic_write, save_weights


def save_dcp(model: nn.Module, optimizer: Optimizer, folder: Path) -> None:
    """Collective: every rank writes its shards of model + optimizer state into ``folder``."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder),
             no_dist=not dist.is_initialized())


def load_dcp(model: nn.Module, optimizer: Optimizer, folder: Path) -> None:
    """Load a DCP checkpoint into ``model``/``optimizer``, resharding as needed (collective under
    a process group; also works in one process without any)."""
    msd, osd = get_state_dict(model, optimizer)  # the templates: this process's shards
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # in one process DCP warns that it loads in one process
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .* single process")
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. tied embedding / LM head)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def load_full(model: nn.Module, optimizer: Optimizer, weights: dict[str, torch.Tensor],
              optim_state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Scatter whole weights and index-keyed optimizer state (the single-process checkpoint
    layout, :mod:`hgf.train.checkpoint`) into a sharded ``model``/``optimizer``."""
    weights = dict(weights)
    for group in tied_names(model):  # a tied tensor is stored once, under one of its names
        stored = next(weights[n] for n in group if n in weights)
        weights.update({n: stored for n in group})
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]  # index -> name
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    osd = {"state": {order[i]: st for i, st in optim_state.items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True))


def export_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write the whole weights to ``path`` (rank 0 writes; collective when sharded)."""
    if not is_sharded(model):
        if is_main_process():
            save_weights(model, path, metadata=metadata)
        return
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if not is_main_process():
        return
    metadata = dict(metadata)
    for keep, *drop in tied_names(model):  # as safetensors.save_model: the first name is kept
        for name in drop:
            metadata.setdefault(name, keep)
            del sd[name]
    sd = {k: v.contiguous() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
