"""HGFLinear: a BitLinear plus a gated low-rank full-precision correction (Hybrid Gated Flow).

    T(x) = BitLinear(x)                      ternary stream
    C(x) = B (A x)                           low-rank FP stream, A ∈ R^{r×d_in}, B ∈ R^{d_out×r}
    additive fusion:  y = T(x) + g · C(x)    (default)
    convex fusion:    y = (1 - g) · T(x) + g · C(x)

``g`` is one learned scalar per projection, ``g = min(φ(α), g_max)`` with φ the gate
parameterization (sigmoid | raw | tanh) and ``g_max`` an upper clamp the trainer ramps during
gate warmup (a non-persistent buffer; 1e9 = no clamp). The correction reads the full-precision
(normalised, unquantized) input. ``A`` is Kaiming-uniform and ``B`` zero, so at initialisation
(additive fusion) the layer equals its BitLinear exactly; the ternary weight keeps the name
``weight`` so BitNet checkpoints load with only ``A``, ``B``, ``gate`` missing.

Training speed: the forward runs as one autograd function, ``y = x_q (μ·W_q)ᵀ + (x Aᵀ)(g·B)ᵀ`` with
the ternary stream's multiplier ``μ = 1`` (additive) or ``1 - g`` (convex), so the gate scales the
small weights instead of the activations; its backward is the STE written out (see
:class:`_HGFLinearFn`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hgf.errors import HGFError
from hgf.model.init import copy_whole_, kaiming_uniform_, whole
from hgf.model.quant import BitLinear, quantized_operands, ternarize

NO_CLAMP = 1e9

GATE_FORWARD = {
    "sigmoid": torch.sigmoid,
    "raw": lambda a: a,
    "tanh": torch.tanh,
}
GATE_INVERSE = {
    "sigmoid": lambda g: math.log(g / (1 - g)),
    "raw": lambda g: g,
    "tanh": math.atanh,
}


class _HGFLinearFn(torch.autograd.Function):
    """Fused HGF projection over N tokens, with ``W_μ = μ·W_q`` (μ = ``t_mult``, the ternary
    stream's multiplier), ``gy = ∂L/∂y`` and the rank-r activations kept transposed,
    ``hᵀ = A xᵀ`` (r×N):
        forward   y = x_q W_μᵀ + h (g·B)ᵀ
        backward  ∂x = gy (W_μ + (g·B) A)           (STE: identity through the quantizer; the
                                                     rank-r term is folded into the weight)
                  ∂W = μ · gyᵀ x_q    ∂μ = Σ W_q ⊙ gyᵀ x_q
                  ∂A = (g·B)ᵀ gyᵀ x   ∂(g·B) = (hᵀ gy)ᵀ
    The r×N layouts are the ones BLAS runs fast for small r. Autograd carries ∂(g·B) on to g and
    B, and ∂μ to g for convex fusion (``t_mult=None`` means μ = 1, additive fusion).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, A: torch.Tensor, g_b: torch.Tensor,
                t_mult: torch.Tensor | None, weight_eps: float, act_eps: float,
                act_bits: int) -> torch.Tensor:
        x_q, w_q = quantized_operands(x, w, weight_eps, act_eps, act_bits)
        dt = x_q.dtype
        xq2 = x_q.reshape(-1, x_q.shape[-1])  # [N, in]
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # [N, in]
        A_, g_b_ = A.to(dt), g_b.to(dt)  # [r, in], [out, r]
        w_mu = w_q if t_mult is None else w_q * t_mult.to(dt)  # [out, in]
        h_t = A_ @ x2.t()  # [r, N]
        y = F.linear(xq2, w_mu).addmm_(h_t.t(), g_b_.t())  # [N, out]
        ctx.save_for_backward(x2, xq2, w_q, A_, g_b_, h_t, t_mult)
        ctx.grad_dtypes = (x.dtype, w.dtype, A.dtype, g_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, xq2, w_q, A_, g_b_, h_t, t_mult = ctx.saved_tensors
        need_x, need_w, need_A, need_gb, need_mu = ctx.needs_input_grad[:5]
        dt_x, dt_w, dt_A, dt_gb = ctx.grad_dtypes
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)  # [N, out]
        w_mu = w_q if t_mult is None else w_q * t_mult.to(w_q.dtype)
        grad_x = grad_w = grad_A = grad_gb = grad_mu = None
        if need_x:
            grad_x = gy @ torch.addmm(w_mu, g_b_, A_)  # [N, in]
            grad_x = grad_x.view(*grad_y.shape[:-1], -1).to(dt_x)
        if need_w or need_mu:
            g_wmu = gy.t() @ xq2  # [out, in]
            if need_mu:
                grad_mu = (g_wmu * w_q).sum().to(t_mult.dtype)
            if need_w:
                grad_w = (g_wmu if t_mult is None else g_wmu * t_mult.to(g_wmu.dtype)).to(dt_w)
        if need_A:
            grad_h_t = g_b_.t().contiguous() @ gy.t()  # [r, N]
            grad_A = (grad_h_t @ x2).to(dt_A)  # [r, in]
        if need_gb:
            grad_gb = (h_t @ gy).t().to(dt_gb)  # [out, r]
        return grad_x, grad_w, grad_A, grad_gb, grad_mu, None, None, None


class HGFLinear(BitLinear):
    hgf_param_roles = {"weight": "ternary", "A": "correction", "B": "correction",
                       "gate": "gate"}  # hgf.model.roles

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        gate: str = "sigmoid",
        gate_init: float = 0.1,
        fusion: str = "additive",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **bitlinear_kwargs: float,
    ) -> None:
        super().__init__(in_features, out_features, device=device, dtype=dtype, **bitlinear_kwargs)
        if rank <= 0:
            raise ValueError(f"HGFLinear rank must be > 0, got {rank}")
        if gate not in GATE_FORWARD:
            raise ValueError(f"unknown gate parameterization {gate!r}")
        if fusion not in ("additive", "convex"):
            raise ValueError(f"unknown fusion {fusion!r}")
        self.rank = rank
        self.gate_kind = gate
        self.gate_init = gate_init
        self.fusion = fusion
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.empty((), device=device, dtype=torch.float32))
        self.register_buffer("gate_max", torch.tensor(NO_CLAMP, device=device), persistent=False)
        self.reset_correction()

    @torch.no_grad()
    def reset_correction(self) -> None:
        """LoRA init: A Kaiming-uniform, B zeros, gate at its init value (and no gate clamp)."""
        kaiming_uniform_(self.A)
        self.B.zero_()
        self.gate.fill_(GATE_INVERSE[self.gate_kind](self.gate_init))
        self.gate_max.fill_(NO_CLAMP)

    def reset_own_parameters(self) -> None:
        """What this class's constructor draws beyond BitLinear's (hgf.model.init.reset_own)."""
        self.reset_correction()

    @torch.no_grad()
    def init_from_residual_svd(self) -> None:
        """LoftQ-like init: A, B from the top-r SVD of the residual ``W - W_t/s_w``, divided by g0
        so that ``g·B A`` starts as the best rank-r fix of the quantization error. A sharded
        layer gathers its whole weight (collective) and keeps its part of A and B."""
        w = whole(self.weight)
        w_t, s = ternarize(w, self.weight_eps)
        resid = w.float() - w_t / s  # [out, in]
        u, sv, vh = torch.linalg.svd(resid, full_matrices=False)
        r = self.rank
        root = sv[:r].sqrt()
        g = float(self.gate_value()) or 1.0
        copy_whole_(self.B, (u[:, :r] * root / g).to(self.B.dtype))  # [out, r]
        copy_whole_(self.A, (root[:, None] * vh[:r]).to(self.A.dtype))  # [r, in]

    def gate_value(self) -> torch.Tensor:
        """The effective gate ``min(φ(α), g_max)`` as a float32 scalar tensor."""
        g = GATE_FORWARD[self.gate_kind](self.gate.float())
        return torch.minimum(g, self.gate_max)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    @torch.no_grad()
    def folded_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inference terms with the gate folded in, ``(A, B' = g·B, μ)`` such that
        ``y = μ·T(x) + B'(A x)`` (float32, on the CPU): the ternary stream's multiplier ``μ = 1``
        for additive fusion and ``1 - g`` for convex fusion, which every exporter folds into the
        ternary scale, so it must not be zero. The one fold used by every exporter (packed,
        BitNet, GGUF)."""
        g = self.gate_value().float().cpu()
        t_mult = 1 - g if self.fusion == "convex" else torch.ones(())
        if abs(float(t_mult)) < 1e-6:
            raise HGFError(f"convex fusion with gate g={float(g):.6g} = 1 zeroes the ternary "
                           "stream; it cannot be folded into the ternary scale")
        return self.A.detach().float().cpu(), g * self.B.detach().float().cpu(), t_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_value()
        t_mult = 1 - g if self.fusion == "convex" else None
        return _HGFLinearFn.apply(x, self.weight, self.A, g * self.B, t_mult, self.weight_eps,
                                  self.act_eps, self.act_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, gate={self.gate_kind}, {self.fusion}"


# ---------------------------------------------------------------------------------------------
# What the trainer needs for the gate schedule


def hgf_layers(model: nn.Module) -> Iterator[tuple[str, HGFLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, HGFLinear):
            yield name, mod


def gate_values(model: nn.Module) -> dict[str, float]:
    """Every gate's effective value, keyed by the projection's module name."""
    with torch.no_grad():
        return {name: float(m.gate_value()) for name, m in hgf_layers(model)}


def set_gate_max(model: nn.Module, value: float) -> None:
    """Set the upper clamp of every gate (gate warmup); ``NO_CLAMP`` removes it."""
    for _, m in hgf_layers(model):
        m.gate_max.fill_(value)


def gate_l2_penalty(model: nn.Module, target: float) -> torch.Tensor | None:
    """``Σ (g - target)²`` over every gate, or None when the model has no gates."""
    terms = [(m.gate_value() - target) ** 2 for _, m in hgf_layers(model)]
    return torch.stack(terms).sum() if terms else None


def gate_clamp_at(step: int, total_steps: int, gate_init: float, warmup_frac: float) -> float:
    """Upper clamp on g at ``step``: linear ramp gate_init → 1 over warmup, then no clamp."""
    warmup = int(round(warmup_frac * total_steps))
    if warmup <= 0 or step >= warmup:
        return NO_CLAMP
    return gate_init + (1.0 - gate_init) * step / warmup


def gates_frozen_at(step: int, total_steps: int, freeze_frac: float) -> bool:
    """True once ``step`` reaches the freeze point (freeze_frac < 1)."""
    return freeze_frac < 1.0 and step >= int(round(freeze_frac * total_steps))
