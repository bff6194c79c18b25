"""HGFLinear: a BitLinear plus a gated low-rank full-precision correction (Hybrid Gated Flow).

    T(x) = BitLinear(x)                      ternary stream
    C(x) = B (A x)                           low-rank FP stream, A ∈ R^{r×d_in}, B ∈ R^{d_out×r}
    additive fusion:  y = T(x) + g · C(x)    (default)
    convex fusion:    y = (1 - g) · T(x) + g · C(x)

``g = min(φ(α), g_max)`` with φ the gate parameterization (sigmoid | raw | tanh) and ``g_max`` an
upper clamp the trainer ramps during gate warmup (a non-persistent buffer; 1e9 = no clamp). The
gate's shape is ``gate_mode`` (docs/METHOD.md §3):

    scalar   α ∈ R              one gate per projection (the paper's, the default)
    channel  α ∈ R^{d_out}      one gate per output channel: g broadcasts over B's rows
    input    g(x) = min(φ(wᵀ t + α), g_max) ∈ R per token, t = T(x) ∈ R^{d_out} the ternary
             stream's output; w ∈ R^{d_out} (``gate_w``) starts at 0, so at init g(x) = φ(α) = g0
             and the layer equals the scalar-gate layer. The gate cannot be folded into B.

The correction reads the full-precision (normalised, unquantized) input. ``A`` is Kaiming-uniform
and ``B`` zero, so at initialisation (additive fusion) the layer equals its BitLinear exactly; the
ternary weight keeps the name ``weight`` so BitNet checkpoints load with only the correction
(``CORRECTION_PARAMS``: ``A``, ``B``, ``gate``, ``gate_w``) missing.

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


GATE_MODES = ("scalar", "channel", "input")
# the parameters an HGFLinear adds to its BitLinear (missing when a BitNet checkpoint is loaded)
CORRECTION_PARAMS = ("A", "B", "gate", "gate_w")


def _rows(a: torch.Tensor) -> torch.Tensor:
    """A per-row factor ``[out]`` as a column ``[out, 1]``; a scalar as it is."""
    return a[:, None] if a.dim() else a


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
    B, and ∂μ to g for convex fusion (``t_mult=None`` means μ = 1, additive fusion). μ is a
    scalar, or one value per output row (channel gates: ``W_μ = diag(μ) W_q``, ∂μ summed per row).
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
        w_mu = w_q if t_mult is None else w_q * _rows(t_mult).to(dt)  # [out, in]
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
        w_mu = w_q if t_mult is None else w_q * _rows(t_mult).to(w_q.dtype)
        grad_x = grad_w = grad_A = grad_gb = grad_mu = None
        if need_x:
            grad_x = gy @ torch.addmm(w_mu, g_b_, A_)  # [N, in]
            grad_x = grad_x.view(*grad_y.shape[:-1], -1).to(dt_x)
        if need_w or need_mu:
            g_wmu = gy.t() @ xq2  # [out, in]
            if need_mu:  # a scalar or per output row (channel gates)
                grad_mu = (g_wmu * w_q).sum(dim=(1,) if t_mult.dim() else None).to(t_mult.dtype)
            if need_w:
                grad_w = (g_wmu if t_mult is None
                          else g_wmu * _rows(t_mult).to(g_wmu.dtype)).to(dt_w)
        if need_A:
            grad_h_t = g_b_.t().contiguous() @ gy.t()  # [r, N]
            grad_A = (grad_h_t @ x2).to(dt_A)  # [r, in]
        if need_gb:
            grad_gb = (h_t @ gy).t().to(dt_gb)  # [out, r]
        return grad_x, grad_w, grad_A, grad_gb, grad_mu, None, None, None


class HGFLinear(BitLinear):
    hgf_param_roles = {"weight": "ternary", "A": "correction", "B": "correction",
                       "gate": "gate", "gate_w": "gate"}  # hgf.model.roles

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        gate: str = "sigmoid",
        gate_init: float = 0.1,
        fusion: str = "additive",
        gate_mode: str = "scalar",
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
        if gate_mode not in GATE_MODES:
            raise ValueError(f"unknown gate mode {gate_mode!r} (known: {', '.join(GATE_MODES)})")
        self.rank = rank
        self.gate_kind = gate
        self.gate_init = gate_init
        self.fusion = fusion
        self.gate_mode = gate_mode
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        shape = (out_features,) if gate_mode == "channel" else ()
        self.gate = nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32))
        if gate_mode == "input":  # w of g(x) = φ(wᵀ T(x) + α); α is ``gate``
            self.gate_w = nn.Parameter(torch.empty(out_features, device=device,
                                                   dtype=torch.float32))
            # mean, min, max of the per-token gates of the last forward (for the logs)
            self.register_buffer("gate_stats", torch.full((3,), float("nan"), device=device),
                                 persistent=False)
        self.register_buffer("gate_max", torch.tensor(NO_CLAMP, device=device), persistent=False)
        self.reset_correction()

    @torch.no_grad()
    def reset_correction(self) -> None:
        """LoRA init: A Kaiming-uniform, B zeros, gate at its init value (every channel; an input
        gate's projection w at 0, so that g(x) = g0), no gate clamp."""
        kaiming_uniform_(self.A)
        self.B.zero_()
        self.gate.fill_(GATE_INVERSE[self.gate_kind](self.gate_init))
        if self.gate_mode == "input":
            self.gate_w.zero_()
            self.gate_stats.fill_(float("nan"))
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
        if self.gate_mode == "channel":
            g = self.gate_value().float()  # [out]
            g = torch.where(g == 0, torch.ones_like(g), g)[:, None]
        else:
            g = float(self.gate_value()) or 1.0
        copy_whole_(self.B, (u[:, :r] * root / g).to(self.B.dtype))  # [out, r]
        copy_whole_(self.A, (root[:, None] * vh[:r]).to(self.A.dtype))  # [r, in]

    def gate_value(self) -> torch.Tensor:
        """The effective gate ``min(φ(α), g_max)`` in float32: a scalar, one value per output
        channel (``gate_mode = channel``), or for an input gate its value at ``wᵀ t = 0`` (the
        per-token gate needs the input: :meth:`input_gate`)."""
        g = GATE_FORWARD[self.gate_kind](self.gate.float())
        return torch.minimum(g, self.gate_max)

    def input_gate(self, t: torch.Tensor) -> torch.Tensor:
        """The per-token gate ``min(φ(wᵀ t + α), g_max)`` ``[..., 1]`` of an input gate, from the
        ternary stream's output ``t [..., out]``."""
        z = F.linear(t, self.gate_w.to(t.dtype)[None]) + self.gate.to(t.dtype)  # [..., 1]
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 → float32, like α
        return torch.minimum(GATE_FORWARD[self.gate_kind](z), self.gate_max)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    @torch.no_grad()
    def folded_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inference terms with the gate folded in, ``(A, B' = g·B, μ)`` such that
        ``y = μ·T(x) + B'(A x)`` (float32, on the CPU): the ternary stream's multiplier ``μ = 1``
        for additive fusion and ``1 - g`` for convex fusion, which every exporter folds into the
        ternary scale, so it must not be zero. The one fold used by every exporter (packed, BitNet,
        GGUF). Channel gates fold into B's rows (``B' = diag(g) B``); under convex fusion their
        ``1 - g`` is one scale per row, which the one-scale-per-tensor formats hold only when every
        channel has the same gate. An input gate depends on each token, so it cannot be folded:
        refused."""
        if self.gate_mode == "input":
            raise HGFError("hgf.gate_mode=input: the gate depends on each token's ternary output, "
                           "so it cannot be folded into B and the export formats have no gate "
                           "projection; export refuses it (train with gate_mode scalar or channel)")
        g = self.gate_value().float().cpu()  # [] or [out]
        if self.fusion == "convex" and g.dim():
            if not bool((g == g[0]).all()):
                raise HGFError("convex fusion with per-channel gates scales each ternary row by "
                               "its own 1 - g; the export formats hold one scale per tensor")
            g_a = g[0]
        else:
            g_a = g
        t_mult = 1 - g_a if self.fusion == "convex" else torch.ones(())
        if abs(float(t_mult)) < 1e-6:
            raise HGFError(f"convex fusion with gate g={float(g_a):.6g} = 1 zeroes the ternary "
                           "stream; it cannot be folded into the ternary scale")
        return self.A.detach().float().cpu(), _rows(g) * self.B.detach().float().cpu(), t_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "input":
            return self._forward_input_gate(x)
        g = self.gate_value()
        t_mult = 1 - g if self.fusion == "convex" else None
        return _HGFLinearFn.apply(x, self.weight, self.A, _rows(g) * self.B, t_mult, self.weight_eps,
                                  self.act_eps, self.act_bits)

    def _forward_input_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``y = a(x)·t + g(x)·C(x)``, ``t = T(x)``, g(x) per token (the fused function needs a
        gate shared by the tokens, so the two streams run separately here)."""
        t = super().forward(x)  # [..., out]
        g = self.input_gate(t)  # [..., 1]
        with torch.no_grad():
            self.gate_stats.copy_(torch.stack([g.mean(), g.min(), g.max()]))
        c = self.correction(x).to(t.dtype)  # [..., out]
        g = g.to(t.dtype)
        return (t if self.fusion == "additive" else (1 - g) * t) + g * c

    def extra_repr(self) -> str:
        mode = "" if self.gate_mode == "scalar" else f" per {self.gate_mode}"
        return (f"{super().extra_repr()}, rank={self.rank}, gate={self.gate_kind}{mode}, "
                f"{self.fusion}")


# ---------------------------------------------------------------------------------------------
# What the trainer needs for the gate schedule


def hgf_layers(model: nn.Module) -> Iterator[tuple[str, HGFLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, HGFLinear):
            yield name, mod


def gate_stats(m: HGFLinear) -> tuple[float, float, float]:
    """(mean, min, max) of a projection's effective gates: a scalar gate's value three times, a
    channel gate's over its channels, an input gate's over the tokens of its last forward (before
    any forward: its value at wᵀ t = 0)."""
    with torch.no_grad():
        if m.gate_mode == "input" and not bool(torch.isnan(m.gate_stats).any()):
            mean, lo, hi = (float(v) for v in m.gate_stats)
            return mean, lo, hi
        g = m.gate_value().float()
        return float(g.mean()), float(g.min()), float(g.max())


def gate_values(model: nn.Module) -> dict[str, float]:
    """Every projection's effective gate (its mean for channel and input gates, see
    :func:`gate_stats`), keyed by the projection's module name."""
    with torch.no_grad():
        return {name: float(m.gate_value()) if m.gate_mode == "scalar" else gate_stats(m)[0]
                for name, m in hgf_layers(model)}


def gate_ranges(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{"min", "max"}`` of every projection whose gate is not one scalar (channel, input)."""
    return {name: dict(zip(("min", "max"), gate_stats(m)[1:], strict=True))
            for name, m in hgf_layers(model) if m.gate_mode != "scalar"}


def set_gate_max(model: nn.Module, value: float) -> None:
    """Set the upper clamp of every gate (gate warmup); ``NO_CLAMP`` removes it."""
    for _, m in hgf_layers(model):
        m.gate_max.fill_(value)


def gate_l2_penalty(model: nn.Module, target: float) -> torch.Tensor | None:
    """``Σ (g - target)²`` over every gate (every channel of a channel gate; an input gate's value
    at wᵀ t = 0, φ(α)), or None when the model has no gates."""
    terms = [(m.gate_value() - target) ** 2 for _, m in hgf_layers(model)]
    terms = [t.sum() if t.dim() else t for t in terms]
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
