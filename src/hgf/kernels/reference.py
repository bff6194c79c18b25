"""Pure-PyTorch reference of the packed ternary projection (BitLinear inference, docs/METHOD.md §3).

    s_x   = 127 / max(max|x|, eps)                 per token, float32
    x_int = clamp(round(x · s_x), -128, 127)        round half to even
    acc   = x_int @ W_tᵀ                            exact integers
    y     = acc / (s_x · s_w)                       float32, then cast to x's dtype

``acc`` is computed in float32 on the CPU, which is exact while ``128 · in < 2^24``
(in ≤ 131072), else (and on other devices, where float32 matmuls may use TF32) in float64. Every
kernel computes the same integers and the same float32 scale and division, so the kernels agree
with this reference bit for bit.
"""

from __future__ import annotations

import torch

from hgf.kernels.packing import unpack_codes
from hgf.model.quant import act_quant

EXACT_F32_IN = 2**17  # 128 · in < 2^24: float32 sums of int8 · ternary products are exact


def ternary_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    packing: str,
    out_features: int,
    in_features: int,
    act_eps: float = 1e-5,
) -> torch.Tensor:
    """``y = (x_int @ W_tᵀ) / (s_x · s_w)`` from packed weights, ``[..., in] -> [..., out]``."""
    exact_f32 = in_features <= EXACT_F32_IN and x.device.type == "cpu"
    acc_dtype = torch.float32 if exact_f32 else torch.float64
    w = unpack_codes(packed, packing, in_features).to(acc_dtype) - 1  # [out, in]
    x_int, s_x = act_quant(x, act_eps)  # [..., in], [..., 1]
    acc = (x_int.to(acc_dtype) @ w.T).float()  # [..., out], exact integers
    return (acc / (s_x * w_scale.float())).to(x.dtype)


def ternary_linear_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    packing: str,
    out_features: int,
    in_features: int,
    act_eps: float = 1e-5,
) -> torch.Tensor:
    """Shape-only implementation of every ternary_linear kernel op (for torch.compile/meta)."""
    return x.new_empty((*x.shape[:-1], out_features))
