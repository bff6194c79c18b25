"""Validation metrics.

    loss  = mean next-token cross entropy over all target tokens, in nats/token
    ppl   = exp(loss)
    bpb   = loss · tokens / (ln 2 · bytes) = loss / (ln 2 · bytes_per_token)   (bits per byte;
            tokenizer-independent, docs/METHOD.md §2), with bytes_per_token measured on the split
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from hgf.model import lm_loss
from hgf.parallel import all_sum, world
from hgf.train.batches import Batch, eval_batches, window_starts
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
def _loss_sums(model: nn.Module, batches: Iterable[tuple[Batch, bool]], device: torch.device,
               autocast: Autocast) -> tuple[float, int]:
    """(Σ loss·tokens, tokens) over the batches flagged True (restores train/eval mode)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for (x, y), counted in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            if counted:
                total += float(lm_loss(logits, y)) * y.numel()
                n += y.numel()
    finally:
        model.train(was_training)
    return total, n


def _result(total: float, n: int, bytes_per_token: float) -> EvalResult:
    mean = total / max(n, 1)
    return EvalResult(loss=mean, ppl=math.exp(min(mean, 700.0)),
                      bpb=mean / (math.log(2) * bytes_per_token), tokens=n)


def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device,
             bytes_per_token: float = float("nan"),
             autocast: Autocast = contextlib.nullcontext,
             ) -> EvalResult:
    """Token-weighted mean loss of ``model`` over ``batches`` (restores train/eval mode)."""
    total, n = _loss_sums(model, ((b, True) for b in batches), device, autocast)
    return _result(total, n, bytes_per_token)


def evaluate_tokens(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                    device: torch.device, bytes_per_token: float = float("nan"),
                    autocast: Autocast = contextlib.nullcontext,
                    max_windows: int = 0) -> EvalResult:
    """:func:`evaluate` over the non-overlapping windows of a token array (the first
    ``max_windows`` of them, or all). Under a process group every rank calls this: each takes
    its share of the batches (:func:`eval_batches`) and the sums are added up over the ranks.
    Every rank runs the same number of forwards (FSDP2 gathers parameters in each): a rank left
    one batch short repeats the first batch without counting it."""
    w = world()
    if w.world_size == 1:
        return evaluate(model, eval_batches(tokens, batch_size, seq_len, max_windows), device,
                        bytes_per_token, autocast)
    n_windows = len(window_starts(len(tokens), seq_len))
    n_windows = min(n_windows, max_windows) if max_windows else n_windows
    rounds = -(-n_windows // (batch_size * w.world_size))  # ceil: batches on the busiest rank
    first = next(eval_batches(tokens, batch_size, seq_len, max_windows))
    mine = eval_batches(tokens, batch_size, seq_len, max_windows, w.rank, w.world_size)
    padded = itertools.chain(((b, True) for b in mine), itertools.repeat((first, False)))
    total, n = _loss_sums(model, itertools.islice(padded, rounds), device, autocast)
    sums = all_sum(torch.tensor([total, n], dtype=torch.float64, device=device)).tolist()
    return _result(sums[0], int(sums[1]), bytes_per_token)
