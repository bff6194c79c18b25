"""BitNet b1.58 quantizers and the training-time ternary projection.

Weights, per tensor (absmean):
    s_w = 1 / max(mean|W|, eps)          W_t = clamp(round(W · s_w), -1, 1) ∈ {-1, 0, +1}
    effective weight  W_q = W_t / s_w
Activations, per token (absmax over the feature dim, int8):
    s_x = 127 / max(max|x|, eps)         x_int = clamp(round(x · s_x), -128, 127)
    effective input   x_q = x_int / s_x
Straight-through estimator: forward uses the quantized value, backward the identity,
    W + (W_q - W).detach(),   x + (x_q - x).detach().
All scales are computed in float32, also under bf16 autocast; the latent weight stays full
precision. At inference the same function is  y = (x_int @ W_tᵀ) / (s_x · s_w).

Training speed: ``BitLinear.forward`` runs ``y = x_q W_qᵀ`` as one autograd function whose backward
is the STE written out, ∂L/∂x = ∂L/∂y · W_q and ∂L/∂W = (∂L/∂y)ᵀ · x_q, so the quantizers run
without building an autograd graph and the forward uses exactly x_q and W_q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weight_scale(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``s_w = 1 / max(mean|W|, eps)`` as a float32 scalar tensor."""
    return 1.0 / w.detach().float().abs().mean().clamp(min=eps)


def ternarize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(W_t, s_w)``: ternary values {-1, 0, 1} (float32) and the float32 scale."""
    s = weight_scale(w, eps)
    return (w.detach().float() * s).round_().clamp_(-1, 1), s


def act_quant(
    x: torch.Tensor, eps: float = 1e-5, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_int, s_x)``: per-token integer codes (float32) and scales ``[..., 1]``."""
    qmax = 2 ** (bits - 1) - 1
    x = x.detach().float()
    s = qmax / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return (x * s).round_().clamp_(-qmax - 1, qmax), s


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, backward identity to ``x``."""
    return x + (q.to(x.dtype) - x).detach()


def quantized_operands(x: torch.Tensor, w: torch.Tensor, weight_eps: float, act_eps: float,
                       act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, W_q)`` = ``(x_int / s_x, W_t / s_w)`` (no autograd graph), in the dtype the matmul
    runs in: the autocast dtype when autocast is on, else ``x.dtype``."""
    x_int, s_x = act_quant(x, act_eps, act_bits)
    w_t, s_w = ternarize(w, weight_eps)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return x_int.div_(s_x).to(dtype), w_t.div_(s_w).to(dtype)


def ste_backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Straight-through ``(∂x, ∂W)`` of ``y = x_q W_qᵀ`` from the saved ``(x_q, W_q)`` and
    ``ctx.grad_dtypes``: the backward of every ternary linear function (BitLinear's, and the
    Tequila/Sherry ``ste_linear``)."""
    x_q, w_q = ctx.saved_tensors
    gy = grad_y.to(x_q.dtype)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = (gy @ w_q).to(ctx.grad_dtypes[0])  # [..., in]
    if ctx.needs_input_grad[1]:
        gy2 = gy.reshape(-1, gy.shape[-1])  # [tokens, out]
        grad_w = (gy2.t() @ x_q.reshape(-1, x_q.shape[-1])).to(ctx.grad_dtypes[1])  # [out, in]
    return grad_x, grad_w


class _TernaryLinearFn(torch.autograd.Function):
    """``y = x_q W_qᵀ`` with straight-through gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, weight_eps: float, act_eps: float,
                act_bits: int) -> torch.Tensor:
        x_q, w_q = quantized_operands(x, w, weight_eps, act_eps, act_bits)  # [..., in], [out, in]
        ctx.save_for_backward(x_q, w_q)
        ctx.grad_dtypes = (x.dtype, w.dtype)
        return F.linear(x_q, w_q)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return (*ste_backward(ctx, grad_y), None, None, None)


class BitLinear(nn.Linear):
    """Ternary-weight, int8-activation projection trained with the STE (no bias).

    Its input must already be RMS-normalised (the block's pre-norms or SubLN do that).
    """

    hgf_role = "ternary"  # hgf.model.roles
    hgf_param_roles = {"weight": "ternary"}
    hgf_sparsity: str | None = None  # the pattern its W_t keeps ("3:4": Sherry); packings with a
    # ``sparsity`` (hgf.kernels.packing) hold only projections of that pattern
    rank = 0  # rank of the low-rank correction: none

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_eps: float = 1e-5,
        act_eps: float = 1e-5,
        act_bits: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.weight_eps = weight_eps
        self.act_eps = act_eps
        self.act_bits = act_bits

    def ternary(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t, s_w)`` of this projection's rule applied to ``weight`` (default its own; export
        packs these; Sherry overrides the rule)."""
        return ternarize(self.weight if weight is None else weight, self.weight_eps)

    def quantized_weight(self) -> torch.Tensor:
        """STE-wrapped effective weight ``W_t / s_w``."""
        w_t, s = ternarize(self.weight, self.weight_eps)
        return ste(self.weight, w_t / s)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """STE-wrapped effective input ``x_int / s_x``."""
        x_int, s = act_quant(x, self.act_eps, self.act_bits)
        return ste(x, x_int / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TernaryLinearFn.apply(x, self.weight, self.weight_eps, self.act_eps, self.act_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary, a{self.act_bits}"
