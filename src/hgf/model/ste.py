"""A ternary projection with a given quantized weight: ``y = x_q W_qᵀ`` with straight-through
gradients, for the linear kinds whose weight quantizer is not BitNet's absmean rule (Tequila
reuses BitNet's, Sherry has its own 3:4 rule; docs/METHODS.md).

    forward   y = x_q W_qᵀ,   x_q = x_int / s_x (per-token int8, as BitLinear)
    backward  ∂L/∂x = ∂L/∂y · W_q,   ∂L/∂W = (∂L/∂y)ᵀ · x_q      (STE: identity through both)

Bit for bit the same as :class:`hgf.model.quant.BitLinear`'s function when ``W_q = W_t / s_w`` of
:func:`hgf.model.quant.ternarize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hgf.model.quant import act_quant, ste_backward


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor, act_eps: float,
                act_bits: int) -> torch.Tensor:
        x_int, s_x = act_quant(x, act_eps, act_bits)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x_q, w_q = x_int.div_(s_x).to(dtype), w_q.detach().to(dtype)  # [..., in], [out, in]
        ctx.save_for_backward(x_q, w_q)
        ctx.grad_dtypes = (x.dtype, w.dtype)
        return F.linear(x_q, w_q)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return (*ste_backward(ctx, grad_y), None, None, None)


def ste_linear(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor, act_eps: float = 1e-5,
               act_bits: int = 8) -> torch.Tensor:
    """``x_q W_qᵀ``; gradients flow to ``x`` and to the latent ``w`` as if ``W_q`` were ``w``."""
    return _QuantLinearFn.apply(x, w, w_q, act_eps, act_bits)
