"""Shared helpers of the training tests: a tiny config and a small synthetic token source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hgf.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


class SyntheticData:
    """A repeating random token pattern (learnable), shaped like ``hgf.data.Prepared``."""

    vocab_size = 64
    tokenizer_path = None

    def __init__(self, seed: int = 0) -> None:
        base = np.random.default_rng(seed).integers(0, self.vocab_size, 37)
        self._tokens = {"train": np.tile(base, 200).astype(np.uint16),
                        "valid": np.tile(base[::-1], 20).astype(np.uint16)}

    def tokens(self, split: str) -> np.ndarray:
        return self._tokens[split]

    def bytes_per_token(self, split: str) -> float:
        return 2.5


def tiny_config(out_dir: Path, arm: str = "hgf", *overrides: str) -> Config:
    """The arm's preset at a very small size: a few steps run in well under a second."""
    base = ["--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=2",
            "--model.n_heads=4", "--model.d_ff=64", "--model.max_seq_len=32",
            "--train.seq_len=16", "--train.batch_size=4", "--train.steps=12",
            "--train.warmup_steps=2", "--train.log_every=1", "--train.progress=false",
            "--eval.every=4", "--eval.batches=2", f"--train.out_dir={out_dir}"]
    return load_config(ROOT / "configs" / f"{arm}.toml", base + list(overrides))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
