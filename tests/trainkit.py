"""Shared helpers of the training tests: small stories written by the test, prepared through
``hgf.data.prepare`` (one BPE and token cache per test session), and a tiny config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hgf.config import Config, load_config
from hgf.data import write_stories

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


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, cache folder) shared by the session's training tests."""
    root = tmp_path_factory.mktemp("train_data")
    write_stories(root / "ds" / "train.txt", make_stories(400, seed=1))
    write_stories(root / "ds" / "valid.txt", make_stories(40, seed=2))
    return root / "ds", root / "cache"


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


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
