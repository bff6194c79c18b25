"""AdamW over the parameter groups of :func:`hgf.model.param_groups`.

Groups: ``decay`` (projection weights, A/B, untied LM head; weight decay), ``no_decay`` (norms,
λ vectors, embeddings) and ``gate`` (HGF gates: no weight decay, LR × hgf.gate_lr_mult). AdamW
with decoupled weight decay:  p ← p·(1 - lr·wd) - lr · m̂ / (sqrt(v̂) + eps).  With lr = 0 the
update is exactly zero, which is how frozen gates stay bitwise unchanged. The fused AdamW kernel
is used on CPU and CUDA (on CPU it is ~4x faster than the per-parameter loop for these models).
"""

from __future__ import annotations

import torch
from torch import nn

from hgf.config import Config
from hgf.model import param_groups


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    t = cfg.train
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel for all params
    return torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=(t.beta1, t.beta2),
                             eps=1e-8, fused=fused)
