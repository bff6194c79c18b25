"""Precision and compilation paths of the trainer: bf16 autocast (CPU here, CUDA when present),
torch.compile (slow), float32 master weights throughout."""

import contextlib
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


def test_float32_gemms_give_the_native_bf16_product():
    """Float32Gemms: a bf16 GEMM computed in float32 from the bf16 inputs and rounded once; the
    native bf16 kernel (float32 accumulation) differs at most by the order of its sums."""
    from hgf.train.device import Float32Gemms

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(48, 96, generator=g).bfloat16(), torch.randn(96, 40, generator=g).bfloat16())
    bias = torch.randn(40, generator=g).bfloat16()
    native = {"mm": a @ b, "addmm": torch.addmm(bias, a, b),
              "bmm": torch.bmm(a[None].expand(2, -1, -1), b[None].expand(2, -1, -1))[0]}
    with Float32Gemms():
        got = {"mm": a @ b, "addmm": torch.addmm(bias, a, b),
               "bmm": torch.bmm(a[None].expand(2, -1, -1), b[None].expand(2, -1, -1))[0],
               "float32 untouched": a.float() @ b.float()}
    assert all(v.dtype == torch.bfloat16 for k, v in got.items() if k != "float32 untouched")
    assert got["float32 untouched"].dtype == torch.float32
    assert torch.equal(got["mm"], (a.float() @ b.float()).bfloat16())
    for k, v in native.items():  # within one bf16 rounding of the native result
        torch.testing.assert_close(got[k].float(), v.float(), rtol=2 ** -7, atol=1e-2)


def test_bf16_step_with_float32_gemms_matches_the_native_one(tmp_path, dataset):
    """One training step of the hgf arm in bf16: loss and gradients through Float32Gemms agree
    with the native bf16 kernels to bf16 precision (the CPU fallback used when oneDNN has no
    bf16 GEMM, hgf.train.device)."""
    import contextlib

    import numpy as np

    from hgf.train.device import Float32Gemms
    from hgf.train.loop import build_trainer, forward_backward_step

    cfg = tiny_config(tmp_path, dataset, "hgf", "--train.dtype=bfloat16")
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 4096).astype(np.int64)
    grads, losses = [], []
    for ctx in (contextlib.nullcontext, Float32Gemms):
        tr = build_trainer(cfg, tokens, torch.device("cpu"))
        x, y = tr.sampler.next()
        with ctx():
            losses.append(forward_backward_step(
                tr.forward, x, y, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
        grads.append(torch.cat([p.grad.flatten() for p in tr.model.parameters()
                                if p.grad is not None]))
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=2e-3)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99


def test_gemm_context_only_where_bf16_gemms_are_not_native(monkeypatch):
    from hgf.train import device as dev

    cpu = torch.device("cpu")
    assert dev.gemm_context(cpu, "float32") is contextlib.nullcontext
    assert dev.gemm_context(torch.device("cuda"), "bfloat16") is contextlib.nullcontext
    monkeypatch.setattr(dev, "native_bf16_gemm", lambda: False)
    with dev.gemm_context(cpu, "bfloat16")():  # noqa: SIM117 (nesting is the point)
        with dev.gemm_context(cpu, "bfloat16")():  # nested: one mode, not two
            from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
            assert sum(isinstance(m, dev.Float32Gemms)
                       for m in _get_current_dispatch_mode_stack()) == 1
    monkeypatch.setattr(dev, "native_bf16_gemm", lambda: True)
    assert dev.gemm_context(cpu, "bfloat16") is contextlib.nullcontext
