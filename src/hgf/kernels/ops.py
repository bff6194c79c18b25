"""``ternary_linear``: BitLinear inference on packed ternary weights, dispatched by device.

    y = (x_int @ W_tᵀ) / (s_x · s_w)      (math in hgf.kernels.reference)

Each kernel is a ``torch.library`` custom op (``hgf::ternary_linear_cpu``,
``hgf::ternary_linear_triton``) with a fake (shape) implementation; the pure-PyTorch reference
is the fallback for every case a kernel does not support (other devices or dtypes, no compiler,
no triton), so an unsupported case is slower, never wrong.
"""

from __future__ import annotations

import torch

from hgf.kernels.packing import packed_shape
from hgf.kernels.reference import ternary_linear_reference

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
    return ternary_linear_reference(x, packed, w_scale, packing, out_features, in_features, act_eps)
