"""Shared helpers of the training tests: small templated stories and a tiny config (the
fixtures live in ``train_fixtures.py``)."""

from __future__ import annotations

import random
from pathlib import Path

from hgf.config import ARMS as CONFIG_ARMS
from hgf.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320  # byte-level BPE: 256 bytes + EOT + merges

NAMES = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna"]
THINGS = ["ball", "cat", "dog", "kite", "cake", "tree", "boat"]
PLACES = ["park", "garden", "house", "river", "school"]


def make_stories(n: int, seed: int) -> list[str]:
    """Templated little stories: repetitive enough that a tiny model learns them in a few steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        out.append(f"Once upon a time, {name} had a {thing}. {name} went to the {place} with the "
                   f"{thing}. {name} was happy. The end.")
    return out


def tiny_config(out_dir: Path, dataset: tuple[Path, Path], arm: str = "hgf",
                *overrides: str) -> Config:
    """The arm's preset at a very small size: a few steps run in well under a second."""
    data, cache = dataset
    base = [f"--model.vocab_size={VOCAB}", "--model.d_model=32", "--model.n_layers=2",
            "--model.n_heads=4", "--model.d_ff=64", "--model.max_seq_len=32",
            "--train.seq_len=16", "--train.batch_size=4", "--train.steps=12",
            "--train.warmup_steps=2", "--train.log_every=1", "--train.progress=false",
            "--eval.every=4", "--eval.batches=2", f"--train.out_dir={out_dir}",
            f"--data.path={data}", f"--data.cache_dir={cache}"]
    return load_config(ROOT / "configs" / f"{arm}.toml", base + list(overrides))


ARMS = tuple(CONFIG_ARMS)  # every arm's preset name


def small_config(arm: str, *overrides: str) -> Config:
    """The arm's preset at a small size for model-only tests (no data)."""
    base = ["--model.vocab_size=96", "--model.d_model=32", "--model.n_layers=3",
            "--model.n_heads=4", "--model.d_ff=72", "--model.max_seq_len=24", "--train.seq_len=16"]
    return load_config(ROOT / "configs" / f"{arm}.toml", base + list(overrides))
