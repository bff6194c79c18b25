"""Where parallelism is applied to a single-device model, from outside (docs/STYLE.md §1).

The trainer starts the process group (:func:`process_group`), builds the model with
:func:`build_parallel` (on the meta device, sharded before it is allocated, then :func:`parallelize`
applied), wraps each micro-batch in :func:`gradient_sync`, and guards file writes and
logging with :func:`is_main_process`. The same entry point runs under ``python`` (one process)
and ``torchrun --nproc_per_node=N`` (``dist.strategy`` ddp or fsdp2); the model code knows
nothing about it. See docs/DISTRIBUTED.md.
"""

from hgf.parallel.apply import (
    build_parallel,
    clip_grad_norm_,
    full_tensor,
    gradient_sync,
    is_sharded,
    parallelize,
    sync_replicated_grads,
)
from hgf.parallel.env import (
    World,
    all_mean,
    all_sum,
    barrier,
    broadcast_object,
    is_main_process,
    process_group,
    world,
)

__all__ = ["World", "all_mean", "all_sum", "barrier", "broadcast_object", "build_parallel",
           "clip_grad_norm_",
           "full_tensor", "gradient_sync", "is_main_process", "is_sharded", "parallelize",
           "process_group", "sync_replicated_grads", "world"]
