"""Initialisation written for the whole tensor, also when the tensor is sharded (docs/STYLE.md §15).

A large model is built on the meta device (nothing allocated), sharded by FSDP2 or swapped,
then materialised with ``to_empty`` and initialised by :meth:`Transformer.init_weights`
(:func:`hgf.model.transformer.materialize` does both). The weights must be those of an eager
build, ``torch.manual_seed(s); build_model(cfg, device)``, bit for bit, on any number of ranks:

- **Same draws, same order.** An eager build draws twice: each layer's constructor initialises
  its own parameters (``nn.Linear``: Kaiming-uniform; ``nn.Embedding``: N(0, 1); HGF ``A``:
  Kaiming-uniform; the λ vectors: N(0, 1)·0.1), then ``Transformer.reset_parameters`` redraws
  the projections and the embedding. :func:`reset_own` replays the first pass module by module,
  children before their parent's own parameters (the order the constructors run in), so the
  global RNG stands where an eager build leaves it when the second pass starts.
- **Whole-tensor draws.** :func:`init_` draws for the whole (global) shape and a sharded
  parameter (a ``DTensor``) keeps its own part: every rank runs the same RNG stream as one
  process, and holds one whole parameter at a time (the largest is the embedding), never the
  whole model. DTensor's own random ops would not do: on CPU each rank draws only its shard's
  numbers, so the ranks' parts would not make up the one-process tensor.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a sharded parameter. A DTensor exists only once ``torch.distributed.tensor`` is
    imported, which costs seconds: hgf.model does not import it itself."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def init_(t: torch.Tensor, fn: Callable[[torch.Tensor], object]) -> None:
    """Apply the in-place init ``fn`` to ``t`` as if to the whole tensor (sharded or not)."""
    if not is_dtensor(t):
        fn(t)
        return
    local = t.to_local()
    whole = torch.empty(t.shape, dtype=local.dtype, device=local.device)  # the global shape
    fn(whole)
    copy_whole_(t, whole)


def copy_whole_(t: torch.Tensor, whole: torch.Tensor) -> None:
    """``t.copy_(whole)``; a sharded ``t`` (DTensor) takes its own part of the whole tensor."""
    if not is_dtensor(t):
        t.copy_(whole)
        return
    from torch.distributed.tensor import Shard, distribute_tensor

    local, mesh, placements = t.to_local(), t.device_mesh, t.placements
    whole = whole.to(local)
    if len(placements) == 1 and type(placements[0]) is Shard and placements[0].dim == 0:
        # FSDP2's layout, torch.chunk on dim 0: copy from a view (no second copy of the part)
        rank, parts = mesh.get_local_rank(), whole.chunk(mesh.size(), dim=0)
        start = sum(len(x) for x in parts[:rank])
        local.copy_(whole[start:start + len(local)])
        return
    part = distribute_tensor(whole, mesh, placements, src_data_rank=None)  # local slicing
    local.copy_(part.to_local())


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; collective for a DTensor."""
    return t.full_tensor() if is_dtensor(t) else t


def kaiming_uniform_(t: torch.Tensor) -> None:
    """``nn.Linear``'s weight init (Kaiming-uniform with a = √5)."""
    init_(t, lambda x: nn.init.kaiming_uniform_(x, a=math.sqrt(5)))


def normal_(t: torch.Tensor, std: float = 1.0) -> None:
    init_(t, lambda x: nn.init.normal_(x, 0.0, std))


def _linear_bias_(mod: nn.Linear) -> None:
    fan_in = mod.weight.shape[1]
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    init_(mod.bias, lambda x: nn.init.uniform_(x, -bound, bound))


@torch.no_grad()
def reset_own(mod: nn.Module) -> None:
    """Initialise ``mod``'s own parameters and buffers (not its children's) as its constructor
    does: the torch base layer's init, then what the hgf layer adds (its
    ``reset_own_parameters``, which also sets its buffers). A layer whose parameters neither
    knows, or which has buffers but no ``reset_own_parameters``, raises, so that no tensor is
    left as ``to_empty`` left it."""
    own = dict(mod.named_parameters(recurse=False))
    buffers = dict(mod.named_buffers(recurse=False))
    if buffers and not hasattr(mod, "reset_own_parameters"):
        raise TypeError(f"{type(mod).__name__} has buffers ({', '.join(buffers)}) but no "
                        "reset_own_parameters(): it cannot be initialised after to_empty")
    if isinstance(mod, nn.Linear):
        known = {"weight", "bias"}
        kaiming_uniform_(mod.weight)
        if mod.bias is not None:
            _linear_bias_(mod)
    elif isinstance(mod, nn.Embedding):
        known = {"weight"}
        normal_(mod.weight)
        if mod.padding_idx is not None:
            mod.weight[mod.padding_idx].fill_(0)
    elif isinstance(mod, nn.RMSNorm | nn.LayerNorm):
        known = set(own)
        for p in own.values():
            p.fill_(1.0 if p is mod.weight else 0.0)
    else:
        known = set()
    extra = set(own) - known  # a subclass's own parameters (an nn.Linear's are weight, bias)
    if extra and not hasattr(mod, "reset_own_parameters"):
        raise TypeError(f"{type(mod).__name__} has parameters ({', '.join(sorted(extra))}) but "
                        "no reset_own_parameters(): it cannot be initialised after to_empty")
    if hasattr(mod, "reset_own_parameters"):
        mod.reset_own_parameters()


def children_first(mod: nn.Module) -> Iterator[nn.Module]:
    """Every module under ``mod`` (itself last), each child's subtree before its parent, in
    registration order: the order in which the constructors drew."""
    for child in mod.children():
        yield from children_first(child)
    yield mod
