"""Precision and compilation paths of the trainer: bf16 autocast (CPU here, CUDA when present),
torch.compile (slow), float32 master weights throughout."""

import math

import pytest
import torch

from hgf.train import train
from trainkit import tiny_config

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _check(res, steps):
    assert sorted(res.losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in res.losses.values())
    assert res.losses[steps] < res.losses[1]  # it learns


def test_bf16_autocast_on_cpu_trains_with_float32_master_weights(tmp_path, dataset):
    cfg = tiny_config(tmp_path, dataset, "hgf", "--train.dtype=bfloat16", "--train.lr=1e-2")
    res = train(cfg)
    _check(res, 12)
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "model.safetensors")).values())


@pytest.mark.gpu
@pytest.mark.parametrize("arm", ["fp16", "hgf"])
def test_cuda_bf16_autocast_trains(tmp_path, dataset, arm):
    res = train(tiny_config(tmp_path, dataset, arm, "--train.device=cuda", "--train.lr=1e-2"))
    _check(res, 12)


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses_as_eager(tmp_path, dataset):
    eager = train(tiny_config(tmp_path / "e", dataset, "hgf", "--train.steps=4"))
    compiled = train(tiny_config(tmp_path / "c", dataset, "hgf", "--train.steps=4",
                                 "--train.compile=true"))
    for k in eager.losses:
        assert compiled.losses[k] == pytest.approx(eager.losses[k], rel=1e-3)
