"""Device and precision: ``train.device`` auto picks CUDA when present (hgf.device);
``train.dtype`` auto means bf16 autocast on CUDA and plain float32 on CPU (master weights always
float32).

bf16 on a CPU without native bf16 matrix products (no AVX-512 BF16 / AMX: oneDNN declines and
PyTorch falls back to a scalar loop; a training step 7-9x slower than in float32 on an AVX2 VM,
results/bench_train_cpu.md) runs every bf16 GEMM in
float32 from its bf16 inputs, rounded back to bf16 (:class:`Float32Gemms`). Products of two bf16
numbers are exact in float32 and a bf16 GEMM accumulates in float32 on every backend
(cuBLAS, oneDNN, ATen's fallback), so the result is the native one up to the order of the sums;
everything else (autocast's casts, the bf16 elementwise ops) is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from hgf.device import resolve_device

__all__ = ["Autocast", "Float32Gemms", "autocast_for", "gemm_context", "native_bf16_gemm",
           "resolve_device"]
Autocast = Callable[[], contextlib.AbstractContextManager]

_aten = torch.ops.aten
# The CPU attention kernel stays native: computing it in float32 would skip the bf16 rounding of
# its probabilities (a different numeric, not the same one faster).
_GEMMS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
                    _aten.baddbmm.default})


class Float32Gemms(TorchDispatchMode):
    """bf16 GEMMs (``mm``, ``addmm``, ``bmm``, ``baddbmm``) computed in float32 from the same bf16
    inputs and rounded back to bf16 (module docstring). Sits below autograd, so it covers the
    backward too when the backward runs inside it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS and any(map(_is_bf16, args)):
            up = [a.float() if _is_bf16(a) else a for a in args]
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def _is_bf16(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16


@functools.cache
def native_bf16_gemm() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (oneDNN with AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def _float32_gemms() -> Iterator[None]:
    if any(isinstance(m, Float32Gemms) for m in _get_current_dispatch_mode_stack()):
        yield  # already inside one (the forward's autocast within the training step's)
        return
    with Float32Gemms():
        yield


def gemm_context(device: torch.device, dtype: str, float32_gemms: bool = True) -> Autocast:
    """A factory of the context that makes bf16 GEMMs fast on this device: :class:`Float32Gemms`
    for bf16 on a CPU without native bf16 GEMMs, else (or with ``float32_gemms=False``, ATen's own
    bf16 kernels, for ``hgf bench train --dtypes bfloat16-aten``) nothing."""
    if (float32_gemms and device.type == "cpu" and dtype == "bfloat16"
            and not native_bf16_gemm()):
        return _float32_gemms
    return contextlib.nullcontext


def autocast_for(device: torch.device, dtype: str, float32_gemms: bool = True) -> Autocast:
    """A factory of the forward's autocast context (bf16 on CUDA for ``auto``), with
    :func:`gemm_context` inside it."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        gemms = gemm_context(device, "bfloat16", float32_gemms)

        @contextlib.contextmanager
        def bf16() -> Iterator[None]:
            with torch.autocast(device.type, dtype=torch.bfloat16), gemms():
                yield
        return bf16
    return contextlib.nullcontext
