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
    return (w.float() * s).round().clamp(-1, 1), s


def act_quant(
    x: torch.Tensor, eps: float = 1e-5, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_int, s_x)``: per-token integer codes (float32) and scales ``[..., 1]``."""
    qmax = 2 ** (bits - 1) - 1
    s = qmax / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return (x.float() * s).round().clamp(-qmax - 1, qmax), s


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, backward identity to ``x``."""
    return x + (q.to(x.dtype) - x).detach()


class BitLinear(nn.Linear):
    """Ternary-weight, int8-activation projection trained with the STE (no bias).

    Its input must already be RMS-normalised (the block's pre-norms or SubLN do that).
    """

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

    def quantized_weight(self) -> torch.Tensor:
        """STE-wrapped effective weight ``W_t / s_w``."""
        w_t, s = ternarize(self.weight, self.weight_eps)
        return ste(self.weight, w_t / s)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """STE-wrapped effective input ``x_int / s_x``."""
        x_int, s = act_quant(x, self.act_eps, self.act_bits)
        return ste(x, x_int / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary, a{self.act_bits}"
