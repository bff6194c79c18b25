"""``parallelize``: wrap a single-device model for ``dist.strategy``, from outside (docs/STYLE.md §1).

Order (as in torchtitan): activation checkpointing per block → torch.compile → data parallelism.
    none   the model itself (``train.compile``: the whole model compiled)
    ddp    DistributedDataParallel: every rank holds the whole model; backward all-reduces the
           gradients (mean over ranks)
    fsdp2  ``fully_shard`` per block, then the root: every rank holds 1/N of every parameter (dim
           0); a block's parameters are all-gathered just before its forward (and again for its
           backward) and its gradients reduce-scattered (mean over ranks)

Gradient semantics. Rank r computes the mean loss over its own b rows (the sampler gives it rows
r·b … (r+1)·b-1 of one shared draw of N·b windows); averaging the gradients over the N ranks gives
exactly the gradient of the mean loss over the global batch N·b, i.e. the update of one process
with batch N·b (up to float summation order). With ``train.grad_accum = k`` only the last of the k
micro-batches synchronizes (:func:`gradient_sync`: DDP ``no_sync`` / FSDP2
``set_requires_gradient_sync``); the earlier ones accumulate locally.

Quantization scales stay exact. BitLinear computes ``s_w = 1 / mean|W|`` inside its forward, and
``fully_shard`` all-gathers the block's whole W before that forward runs, so the scale (and the
ternary weight) is that of the FULL weight, never of a 1/N shard. tests/test_dist.py checks it:
the FSDP2 losses equal the single-process ones.

0-dim parameters (the HGF gates) cannot be sharded on dim 0: FSDP2 leaves them whole on every
rank (``ignored_params``) and :func:`sync_replicated_grads` averages their gradients by hand. The
gates of every shape (``hgf.gate_mode`` channel and input: ``gate``, ``gate_w``) are kept whole the
same way, so that the trainer reads and logs them outside a forward as plain tensors.

Mixed precision (fsdp2 on CUDA with bf16 training): parameters are all-gathered in bf16 and
gradients reduced in float32 (``MixedPrecisionPolicy``); the float32 master weights stay sharded,
so the ternary scale is computed in float32 from the bf16-rounded weight. On CPU all is float32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from hgf.config import Config
from hgf.errors import HGFError
from hgf.model.hgf_linear import hgf_layers
from hgf.parallel.env import world


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply activation checkpointing, compile and ``cfg.dist.strategy`` to ``model`` (a
    :class:`hgf.model.Transformer` on its device); return the module to call for training.

    Under fsdp2 ``model`` itself becomes the sharded module (its parameters are DTensors); build
    the optimizer from it afterwards. Under ddp the returned wrapper shares ``model``'s parameters.
    """
    strategy = cfg.dist.strategy
    if cfg.dist.activation_checkpointing:
        for block in model.layers:
            _checkpoint(block)
    if strategy == "none":
        return torch.compile(model) if cfg.train.compile else model
    if not dist.is_initialized():
        raise HGFError(f"dist.strategy={strategy} needs a process group (train through "
                       "hgf.train.train or inside hgf.parallel.process_group)")
    if cfg.train.compile:
        for block in model.layers:
            block.compile()
    device = next(model.parameters()).device
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return _fully_shard(model, device, _bf16(cfg, device))


def _checkpoint(block: nn.Module) -> None:
    """Keep only the block's input; recompute its activations in backward. The block's own
    ``forward`` is replaced (no wrapper module), so parameter names do not change, and the
    checkpoint sits inside what ``block.compile()`` traces."""
    forward = block.forward

    def checkpointed(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def _bf16(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.train.dtype in ("auto", "bfloat16")


def _fully_shard(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    mesh = init_device_mesh(device.type, (world().world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    whole = {p for p in model.parameters() if p.ndim == 0}  # HGF gates: kept whole, see above
    whole |= {p for _, m in hgf_layers(model) for name, p in m.named_parameters(recurse=False)
              if name in ("gate", "gate_w")}
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=whole)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=whole)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded by FSDP2 (its state must be saved collectively)."""
    return isinstance(model, FSDPModule)


def gradient_sync(forward: object, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward+backward: gradients are synchronized across ranks
    only when ``sync`` (the last micro-batch of an update)."""
    if isinstance(forward, DistributedDataParallel) and not sync:
        return forward.no_sync()
    if isinstance(forward, FSDPModule):
        forward.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def sync_replicated_grads(forward: object) -> None:
    """Average over the ranks the gradients of the parameters FSDP2 keeps whole (the gates)."""
    if not isinstance(forward, FSDPModule) or world().world_size == 1:
        return
    grads = [p.grad for p in forward.parameters()
             if p.grad is not None and not isinstance(p, DTensor)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [Σ numel]
    dist.all_reduce(flat)
    flat.div_(world().world_size)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also handles a mix of sharded (DTensor) and whole
    gradients: ‖g‖ = sqrt(‖g_sharded‖² + ‖g_whole‖²) over the FULL gradient on every rank."""
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()]
    if whole:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in whole]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, whole):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; collective for a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t
