"""Shared helpers of the init.from / distillation / conversion-study tests: a small trained
full-precision source run and tiny arm configs that take their architecture from it."""

from __future__ import annotations

from pathlib import Path

import torch

from hgf.config import Config
from hgf.train import train
from hgf.train.init_from import load_train_config
from trainkit import ROOT, tiny_config


def train_source(out: Path, dataset: tuple[Path, Path]) -> Path:
    """A tiny full-precision run trained for 12 steps (the model the tests convert)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(out, dataset, "fp16", "--train.lr=3e-3", "--eval.every=0",
                          "--eval.full_at_end=false"))
    finally:
        torch.set_num_threads(before)
    return out


def arm_config(out: Path, dataset: tuple[Path, Path], arm: str, src: Path, *over: str) -> Config:
    """configs/<arm>.toml initialised from ``src`` with trainkit's tiny run settings and no model
    size (it comes from the source): 6 steps of 4 × 16 tokens."""
    data, cache = dataset
    base = ["--train.seq_len=16", "--train.batch_size=4", "--train.steps=6",
            "--train.warmup_steps=2", "--train.log_every=1", "--train.progress=false",
            "--eval.every=0", "--eval.full_at_end=false", f"--train.out_dir={out}",
            f"--data.path={data}", f"--data.cache_dir={cache}", f"--init.from={src}"]
    return load_train_config(ROOT / "configs" / f"{arm}.toml", base + list(over))
