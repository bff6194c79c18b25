"""Fixtures of the training tests, loaded with ``pytest_plugins = ["train_fixtures"]``: small
stories written by the test and prepared through ``hgf.data.prepare`` (one BPE and token cache per
test session), and single-threaded torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hgf.data import write_stories
from trainkit import make_stories


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, cache folder) shared by the session's training tests."""
    root = tmp_path_factory.mktemp("train_data")
    write_stories(root / "ds" / "train.txt", make_stories(400, seed=1))
    write_stories(root / "ds" / "valid.txt", make_stories(40, seed=2))
    return root / "ds", root / "cache"


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
