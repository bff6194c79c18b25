"""Validation metrics.

    loss  = mean next-token cross entropy over all target tokens, in nats/token
    ppl   = exp(loss)
    bpb   = loss · tokens / (ln 2 · bytes) = loss / (ln 2 · bytes_per_token)   (bits per byte;
            tokenizer-independent, METHOD.md §2), with bytes_per_token measured on the split
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from hgf.model import lm_loss
from hgf.train.batches import Batch, eval_batches
from hgf.train.device import Autocast


@dataclass
class EvalResult:
    loss: float  # nats/token
    ppl: float
    bpb: float  # bits per byte (nan when bytes_per_token is unknown)
    tokens: int

    def to_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device,
             bytes_per_token: float = float("nan"),
             autocast: Autocast = contextlib.nullcontext,
             ) -> EvalResult:
    """Token-weighted mean loss of ``model`` over ``batches`` (restores train/eval mode)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            total += float(lm_loss(logits, y)) * y.numel()
            n += y.numel()
    finally:
        model.train(was_training)
    mean = total / max(n, 1)
    return EvalResult(loss=mean, ppl=math.exp(min(mean, 700.0)),
                      bpb=mean / (math.log(2) * bytes_per_token), tokens=n)


def evaluate_tokens(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                    device: torch.device, bytes_per_token: float = float("nan"),
                    autocast: Autocast = contextlib.nullcontext,
                    max_windows: int = 0) -> EvalResult:
    """:func:`evaluate` over the non-overlapping windows of a token array (the first
    ``max_windows`` of them, or all)."""
    return evaluate(model, eval_batches(tokens, batch_size, seq_len, max_windows), device,
                    bytes_per_token, autocast)
