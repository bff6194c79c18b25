"""Training batches and validation windows cut from a 1-D token array.

A window is ``seq_len + 1`` consecutive tokens: inputs ``w[:-1]``, targets ``w[1:]``.

Training: each step draws ``batch_size × world_size`` window starts uniformly from
``[0, n - seq_len - 1]`` with one seeded NumPy generator shared (identically) by every rank; rank
``r`` takes rows ``r·batch_size … (r+1)·batch_size - 1``. The generator state is plain JSON
(:meth:`BatchSampler.state_dict`), so a resumed run draws exactly the batches it would have drawn.

Validation: non-overlapping windows with stride ``seq_len`` (every token after the first is a
target exactly once); a tail shorter than a window is dropped. The fixed subset evaluated during
training is the first ``eval.batches × batch_size × world_size`` of them (the same windows for
any split of one global batch over processes), dealt out to the ranks batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hgf.errors import HGFError

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs [b, t], targets [b, t] (int64)


def _check(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if tokens.ndim != 1:
        raise HGFError(f"{what} tokens must be a 1-D array, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise HGFError(f"{what} split has {len(tokens)} tokens, fewer than one window of "
                       f"train.seq_len+1={seq_len + 1}")


def _stack(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(rows)  # [b, seq_len + 1]
    return w[:, :-1], w[:, 1:]


class BatchSampler:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        _check(tokens, seq_len, "train")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> Batch:
        high = len(self.tokens) - self.seq_len  # exclusive upper bound of a start
        starts = self.rng.integers(0, high, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _stack(self.tokens, mine, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def window_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """Starts of the non-overlapping validation windows (stride seq_len)."""
    return np.arange(0, n_tokens - seq_len, seq_len)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_windows: int = 0,
                 rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Validation batches over the first ``max_windows`` windows (0 = all of them); with
    ``world_size`` N processes rank r gets batches r, r+N, r+2N, … of that sequence."""
    _check(tokens, seq_len, "valid")
    starts = window_starts(len(tokens), seq_len)
    if max_windows:
        starts = starts[:max_windows]
    for i in range(rank * batch_size, len(starts), batch_size * world_size):
        yield _stack(tokens, starts[i:i + batch_size], seq_len)
