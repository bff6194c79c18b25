"""``ternary_linear``: BitLinear inference on packed ternary weights, dispatched by device.

    y = (x_int @ W_tᵀ) / (s_x · s_w)      (math in hgf.kernels.reference)

Each kernel is a ``torch.library`` custom op (``hgf::ternary_linear_cpu``,
``hgf::ternary_linear_triton``) with a fake (shape) implementation; the pure-PyTorch reference
is the fallback for every case a kernel does not support, so an unsupported case is slower,
never wrong. Dispatch (:func:`kernel_for`):

    CPU tensor, C++ kernel built           -> hgf::ternary_linear_cpu (any batch, fp32/bf16/fp16)
    CUDA tensor, triton importable         -> hgf::ternary_linear_triton (GEMV <= 8 tokens, GEMM)
    anything else, or in_features > 2^17   -> ternary_linear_reference
    a packing without that kernel in its registry entry (``Packing.kernels``) -> the reference
    (sherry: hgf::sherry_linear_cpu on the CPU, its ``Packing.cpu_op``; no GPU kernel)
All of them give the same bits as the reference (tests/test_kernels.py checks it).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from hgf.kernels import cpu
from hgf.kernels.packing import get_packing, packed_shape
from hgf.kernels.reference import EXACT_F32_IN, ternary_linear_fake, ternary_linear_reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_args(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, packing: str,
    out_features: int, in_features: int,
) -> None:
    """Raise ValueError naming the first argument that does not fit."""
    shape = packed_shape(out_features, in_features, packing)  # also checks the packing name
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"ternary_linear: x must be float32/bfloat16/float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"ternary_linear: x has shape {tuple(x.shape)}, expected [..., {in_features}]")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != shape:
        raise ValueError(f"ternary_linear: packed must be uint8 {shape}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if w_scale.numel() != 1:
        raise ValueError(
            f"ternary_linear: w_scale must be a scalar, got shape {tuple(w_scale.shape)}")
    if packed.device != x.device:
        raise ValueError(f"ternary_linear: x on {x.device}, packed on {packed.device}")


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    packing: str,
    out_features: int,
    in_features: int,
    act_eps: float = 1e-5,
) -> torch.Tensor:
    """BitLinear inference ``[..., in] -> [..., out]`` with the fastest correct kernel."""
    check_args(x, packed, w_scale, packing, out_features, in_features)
    args = (x, packed, w_scale, packing, out_features, in_features, act_eps)
    kernel = kernel_for(x, in_features, packing)
    if kernel == "cpu":  # the packing's C++ op (hgf::sherry_linear_cpu for sherry)
        return getattr(torch.ops.hgf, get_packing(packing).cpu_op)(*args)
    if kernel == "triton":
        return torch.ops.hgf.ternary_linear_triton(*args)
    return ternary_linear_reference(*args)


@torch.compiler.assume_constant_result
@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_for(x: torch.Tensor, in_features: int, packing: str | None = None) -> str:
    """Which implementation ``ternary_linear`` runs for this input: "cpu", "triton" or
    "reference" (other devices, or kernels unavailable, or ``in_features > 2^17``, or a
    ``packing`` the kernel has no path for)."""
    if in_features > EXACT_F32_IN:
        return "reference"
    if packing is not None:
        kernel = kernel_for(x, in_features)
        return kernel if kernel in get_packing(packing).kernels else "reference"
    if x.device.type == "cpu" and cpu.available():
        return "cpu"
    if x.device.type == "cuda" and triton_available():
        return "triton"
    return "reference"


@torch.library.custom_op("hgf::ternary_linear_triton", mutates_args=(), device_types="cuda")
def _ternary_linear_triton(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, packing: str,
    out_features: int, in_features: int, act_eps: float,
) -> torch.Tensor:
    from hgf.kernels.triton_kernels import ternary_linear_triton

    return ternary_linear_triton(x, packed, w_scale, packing, out_features, in_features, act_eps)


_ternary_linear_triton.register_fake(ternary_linear_fake)
