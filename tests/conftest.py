import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A working directory with the repository's arm and reproduce presets and no runs (the why
    and methods report tests)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs",
                    ignore=shutil.ignore_patterns("scale", "tinystories"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
