"""Tequila (Huang et al., "Tequila: Trapping-free Ternary Quantization for Large Language
Models", ICLR 2026; code Tencent/AngelSlim, read not copied): the weights that ternarize to 0
(the dead zone) are reused as a dynamic bias.

With BitNet's quantizer (hgf.model.quant: ``W_t = clamp(round(W · s_w), -1, 1)``, s_w = 1/mean|W|)
and the dead zone ``D = {(j, i): W_t[j, i] = 0}``:

    y_j = (x_q W_qᵀ)_j + b_j,        b_j = λ · Σ_{i : (j,i) ∈ D} W[j, i]

The bias does not depend on x, so at inference it is a per-row constant computed once at export
(``N.bias`` in the packed file): the cost is one float32 add per output. In training it is a
function of the latent weights, so the dead-zone weights get a direct gradient

    ∂L/∂W[j, i] = (STE term) + λ · ∂L/∂b_j      for (j, i) ∈ D

instead of only the noisy STE signal that leaves them trapped. λ (``tequila.bias_scale``) is
1e-3 and fixed, the value of the released recipe (``ultraquantv2`` with ``eps 1e-3``);
``tequila.learn_scale = true`` makes it a learned scalar per projection (the paper's text calls
the reactivation weights learnable; the released v2 recipe keeps them fixed) [D].

Where hgf departs from the paper's code [D]: the quantizer is BitNet's per-tensor absmean (the
paper's code uses groups of 128 weights per scale), so the backbone is exactly a BitLinear's and
packs with i2/tq1; activations are int8 per token as for BitLinear (the paper's runs keep 16-bit
activations), so that the packed kernels run it.
"""

from __future__ import annotations

import torch
from torch import nn

from hgf.model.quant import BitLinear, ternarize
from hgf.model.ste import ste_linear


class TequilaLinear(BitLinear):
    """BitLinear plus the dead-zone bias ``b = λ · Σ_{dead} W`` (per output row)."""

    # hgf.model.roles: λ is the "bias" role (folded into the float32 N.bias at export)
    hgf_param_roles = {"weight": "ternary", "bias_lambda": "bias"}

    def __init__(self, in_features: int, out_features: int, *, bias_scale: float = 1e-3,
                 learn_scale: bool = False, weight_eps: float = 1e-5, act_eps: float = 1e-5,
                 act_bits: int = 8, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, weight_eps=weight_eps, act_eps=act_eps,
                         act_bits=act_bits, device=device, dtype=dtype)
        self.bias_scale_init = bias_scale
        lam = torch.full((), float(bias_scale), device=device, dtype=torch.float32)
        # a parameter either way (frozen unless learned), so that its role declares the bias
        self.bias_lambda = nn.Parameter(lam, requires_grad=learn_scale)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "bias_lambda") and self.bias_lambda.device.type != "meta":
            with torch.no_grad():
                self.bias_lambda.fill_(self.bias_scale_init)

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        """What this class's constructor sets beyond BitLinear's (hgf.model.init.reset_own)."""
        self.bias_lambda.fill_(self.bias_scale_init)

    def dead_bias(self) -> torch.Tensor:
        """``b = λ · Σ_{i: W_t[j,i] = 0} W[j, i]`` as float32 ``[out]`` (differentiable in W, λ)."""
        w_t, _ = ternarize(self.weight, self.weight_eps)
        dead = (w_t == 0).to(self.weight.dtype)  # [out, in], no gradient
        return self.bias_lambda * (self.weight * dead).float().sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_t, s_w = ternarize(self.weight, self.weight_eps)
        dead = (w_t == 0).to(self.weight.dtype)  # [out, in], no gradient
        y = ste_linear(x, self.weight, w_t.div_(s_w), self.act_eps, self.act_bits)
        b = self.bias_lambda * (self.weight * dead).float().sum(dim=1)  # [out]
        return y + b.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tequila λ={float(self.bias_lambda):.3g}"
