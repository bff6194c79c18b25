"""PTQTP: post-training quantization of a full-precision weight to two ternary trit-planes.

A trained weight W [out, in] is approximated, without training, by

    Ŵ = α₁ ⊙ T₁ + α₂ ⊙ T₂        T₁, T₂ ∈ {-1, 0, +1}^{out×in},   α₁, α₂ ∈ R^{out}  (one per row)

(Xiao et al., "PTQTP: Post-Training Quantization to Trit-Planes for Large Language Models",
arXiv 2509.16989). The fit minimises ‖W − Ŵ‖²_F row by row, alternating two exact steps:

    α-step  planes fixed: per row the 2×2 least-squares system  G α = r,
            G = [[T₁·T₁, T₁·T₂], [T₁·T₂, T₂·T₂]],  r = [W·T₁, W·T₂]
            solved in closed form (Cramer; the entries of G are integers, so det G = 0 exactly
            when a plane is empty on the row or T₂ = ±T₁ there: then α = (W·T/T·T, 0) on the
            plane that spans the row's fit, still a least-squares optimum)
    T-step  α fixed: per element the pair (t₁, t₂) ∈ {-1, 0, 1}² whose α₁t₁ + α₂t₂ is closest
            to w (an exhaustive search over the 9 pairs; ties go to the pair with more zeros)

Neither step can increase the error, so ‖W − Ŵ‖² is non-increasing over the rounds.

Init (progressive): T₁ = the per-row absmean ternarization clamp(round(W/mean|W_row|), -1, 1),
α₁ its least-squares scale; T₂ the same ternarization of the residual R = W − α₁T₁; then one
α-step over both planes. Stopping: after ``iterations`` rounds, or as soon as a round lowers the
error by less than ``tol`` × the error before it (a round that changes no trit lowers it by 0).
Defaults (``[ptqtp]``): 50 rounds, tol 1e-4. Choices where the paper's text is silent or differs
are listed in docs/METHODS.md ("PTQTP").

The model layer: :class:`PTQTPLinear` holds the fitted planes and scales as fixed buffers (int8
planes [2, out, in], float32 α [2, out]; nothing is trained) and computes

    y = α₁ ⊙ (x_q T₁ᵀ) + α₂ ⊙ (x_q T₂ᵀ) = x_q Ŵᵀ,
    x_q = x_int / s_x  (per-token absmax int8, as BitLinear; ``ptqtp.activations = int8``)
    x_q = x            (``ptqtp.activations = fp``: weight-only, the paper's setting)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hgf.model.quant import act_quant

# the 9 (t1, t2) pairs, those with more zeros first (argmin keeps the first of equal errors)
PAIRS = torch.tensor([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1),
                      (1, 1), (1, -1), (-1, 1), (-1, -1)], dtype=torch.float32)  # [9, 2]
CHUNK_ELEMENTS = 1 << 22  # elements of W per T-step chunk (the search holds 9 × that)


@dataclass
class TritPlaneFit:
    """Two ternary planes and their row scales: ``W ≈ alpha[0, :, None]·planes[0] + alpha[1, :,
    None]·planes[1]``; ``errors[k]`` = ‖W − Ŵ‖²_F after round k (k = 0: the init)."""

    planes: torch.Tensor  # int8 [2, out, in]
    alpha: torch.Tensor  # float32 [2, out]
    errors: list[float] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.errors) - 1

    def dense(self) -> torch.Tensor:
        """Ŵ = α₁ ⊙ T₁ + α₂ ⊙ T₂ as float32 [out, in]."""
        return dense_weight(self.planes, self.alpha)


def dense_weight(planes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    p = planes.float()
    return alpha[0, :, None] * p[0] + alpha[1, :, None] * p[1]  # [out, in]


def absmean_rows(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-row absmean ternarization: clamp(round(W / mean|W_row|), -1, 1)."""
    s = w.abs().mean(dim=1, keepdim=True).clamp(min=eps)  # [out, 1]
    return (w / s).round().clamp(-1, 1)


def scale_1(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Least-squares row scale of one plane: (W·T)/(T·T) per row (0 for an empty row)."""
    tt = (t * t).sum(1)
    return torch.where(tt > 0, (w * t).sum(1) / tt.clamp(min=1), torch.zeros_like(tt))


def solve_alpha(w: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """The least-squares α [2, out] given the planes (the α-step; see the module docstring)."""
    # G's entries are integer counts (exact in float32 below 2^24 columns), then float64 so that
    # det = 0 is exact; r in float32 (pairwise summation), no float64 copy of W
    a, b, c = (t1.abs().sum(1).double(), (t1 * t2).sum(1).double(), t2.abs().sum(1).double())
    r1, r2 = (w * t1).sum(1).double(), (w * t2).sum(1).double()
    det = a * c - b * b
    ok = det > 0
    d = torch.where(ok, det, torch.ones_like(det))
    a1 = torch.where(ok, (c * r1 - b * r2) / d, torch.zeros_like(d))
    a2 = torch.where(ok, (a * r2 - b * r1) / d, torch.zeros_like(d))
    # det = 0: plane 2 empty or ±plane 1 on the row -> fit with plane 1 (or plane 2 alone)
    only1 = ~ok & (a > 0)
    only2 = ~ok & (a == 0) & (c > 0)
    a1 = torch.where(only1, r1 / a.clamp(min=1), a1)
    a2 = torch.where(only2, r2 / c.clamp(min=1), a2)
    return torch.stack([a1, a2]).float()  # [2, out]


def best_pairs(w: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T-step: per element the (t1, t2) minimising (w − α₁t₁ − α₂t₂)²."""
    pairs = PAIRS.to(w.device)
    values = alpha.t() @ pairs.t()  # [out, 9]: α₁t₁ + α₂t₂ of each pair
    t1, t2 = torch.empty_like(w), torch.empty_like(w)
    rows = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):
        err = (w[i:i + rows, :, None] - values[i:i + rows, None, :]).square()  # [rows, in, 9]
        best = err.argmin(dim=2)  # [rows, in]
        t1[i:i + rows], t2[i:i + rows] = pairs[best, 0], pairs[best, 1]
    return t1, t2


def squared_error(w: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                  alpha: torch.Tensor) -> float:
    return float((w - alpha[0, :, None] * t1 - alpha[1, :, None] * t2).double().square().sum())


@torch.no_grad()
def fit_trit_planes(w: torch.Tensor, iterations: int = 50, tol: float = 1e-4) -> TritPlaneFit:
    """Fit W [out, in] by two ternary planes with row scales (see the module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"fit_trit_planes expects a 2-D [out, in] weight, got {tuple(w.shape)}")
    w = w.detach().float()
    t1 = absmean_rows(w)
    t2 = absmean_rows(w - scale_1(w, t1)[:, None] * t1)
    alpha = solve_alpha(w, t1, t2)
    errors = [squared_error(w, t1, t2, alpha)]
    for _ in range(iterations):
        t1, t2 = best_pairs(w, alpha)
        alpha = solve_alpha(w, t1, t2)
        errors.append(squared_error(w, t1, t2, alpha))
        if errors[-2] - errors[-1] <= tol * errors[-2]:
            break
    planes = torch.stack([t1, t2]).to(torch.int8)  # [2, out, in]
    return TritPlaneFit(planes, alpha, errors)


class PTQTPLinear(nn.Module):
    """Two fixed ternary planes with row scales (no parameters; see the module docstring).

    Made by ``hgf convert SRC --to ptqtp`` from a dense projection (:meth:`from_fit`); a model
    built from a config holds zeros until its weights are loaded."""

    hgf_role = "ptqtp"  # hgf.model.roles: packed as two ternary planes (hgf.infer.ptqtp)

    def __init__(self, in_features: int, out_features: int, *, activations: str = "int8",
                 act_eps: float = 1e-5, act_bits: int = 8,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if activations not in ("int8", "fp"):
            raise ValueError(f"activations must be int8 or fp, got {activations!r}")
        self.in_features, self.out_features = in_features, out_features
        self.activations, self.act_eps, self.act_bits = activations, act_eps, act_bits
        self.register_buffer("planes", torch.zeros(2, out_features, in_features,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("alpha", torch.zeros(2, out_features, dtype=torch.float32,
                                                  device=device))

    @torch.no_grad()
    def load_fit(self, fit: TritPlaneFit) -> PTQTPLinear:
        self.planes.copy_(fit.planes)
        self.alpha.copy_(fit.alpha)
        return self

    def dense_weight(self) -> torch.Tensor:
        """Ŵ = α₁ ⊙ T₁ + α₂ ⊙ T₂, float32 [out, in]."""
        return dense_weight(self.planes, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8":
            x_int, s_x = act_quant(x, self.act_eps, self.act_bits)
            x = x_int.div_(s_x).to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype))

    def extra_repr(self) -> str:
        a = f"a{self.act_bits}" if self.activations == "int8" else "a-fp"
        return f"in_features={self.in_features}, out_features={self.out_features}, 2 trit-planes, {a}"
