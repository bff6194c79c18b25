"""Sherry (Huang et al., "Sherry: Hardware-Efficient 1.25-Bit Ternary Quantization via
Fine-grained Sparsification", arXiv 2601.07892; code Tencent/AngelSlim, read not copied):
3:4 sparse ternary weights, trained with the annealed residual path Arenas.

Weights: along the input dim, every group of 4 consecutive weights keeps its 3 largest |W| as
±1 and sets the smallest to 0 (ties: the first minimum), so each group has exactly one zero:

    T[j, 4g+k] = sign(W[j, 4g+k]) · [k ≠ argmin_k' |W[j, 4g+k']|]      (sign(0) = +1)
    s_w = 1 / max(mean_{T ≠ 0} |W|, eps)          effective weight  W_q = T / s_w

(the mean of the kept magnitudes, per tensor). Activations: per-token int8 as BitLinear.
Straight-through estimator for both, as BitLinear (every latent weight, kept or pruned, gets the
gradient of W_q).

Arenas (annealing residual synapse): while training, the latent full-precision weight also feeds
the output through a residual that fades out,

    y = x_q W_qᵀ + ε(t) · x Wᵀ,        ε = 0 in eval mode and at inference,

with ε(t), t the optimizer step (0-based), S the schedule length (train.schedule_steps or
train.steps), w = arenas_warmup_frac · S, e = arenas_end_frac · S:
    t + 1 ≤ w:      ε = ε_max · (t + 1) / w                   (linear warmup)
    w < t + 1 < e:  ε = ε_max · ½ (1 + cos(π (t + 1 − w) / (e − w)))   (cosine decay)
    t + 1 ≥ e:      ε = 0
The released code's defaults are ε_max = 1, w = S/10, e = S (``sherry.arenas_max``,
``sherry.arenas_warmup_frac``, ``sherry.arenas_end_frac``); ``sherry.arenas = false`` trains the
plain 3:4 model. The trainer sets ε each step (:func:`set_arenas`), so a resumed run continues
the same schedule.

Where hgf departs from the paper's code [D]: one scale per tensor (the code: one per 128
weights), since the packed runtime keeps one scalar per projection; int8 activations (the paper's
runs keep 16-bit ones); the residual reads the layer's unquantized input x; the schedule counts
optimizer steps (the code counts forward calls of each layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgf.model.quant import BitLinear
from hgf.model.ste import ste_linear

GROUP = 4  # weights per 3:4 group


def sherry_ternarize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, s_w)``: 3:4 sparse ternary values (float32 ``[out, in]``) and the float32 scale."""
    out_f, in_f = w.shape
    if in_f % GROUP:
        raise ValueError(f"sherry: in_features={in_f} is not a multiple of {GROUP}")
    wf = w.detach().float().view(out_f, in_f // GROUP, GROUP)  # [out, G, 4]
    zero = wf.abs().argmin(dim=-1, keepdim=True)  # [out, G, 1]: the first smallest |W|
    keep = torch.ones_like(wf, dtype=torch.bool).scatter_(-1, zero, False)
    t = torch.where(wf >= 0, 1.0, -1.0) * keep  # [out, G, 4]
    mean_kept = (wf.abs() * keep).sum() / max(1, keep.sum().item())
    s = 1.0 / mean_kept.clamp(min=eps)
    return t.view(out_f, in_f), s


def arenas_at(step: int, steps: int, eps_max: float = 1.0, warmup_frac: float = 0.1,
              end_frac: float = 1.0) -> float:
    """ε of the Arenas residual at optimizer step ``step`` (0-based) of a ``steps``-long
    schedule (module docstring)."""
    t, warm, end = step + 1, warmup_frac * steps, end_frac * steps
    if t >= end:
        return 0.0
    if t <= warm:
        return eps_max * t / warm
    return eps_max * 0.5 * (1 + math.cos(math.pi * (t - warm) / (end - warm)))


class SherryLinear(BitLinear):
    """3:4 sparse ternary projection with the Arenas residual (training only)."""

    hgf_sparsity = "3:4"  # packs with i2 / tq1, and with sherry (hgf.kernels.packing)

    def __init__(self, in_features: int, out_features: int, *, arenas: bool = True,
                 weight_eps: float = 1e-5, act_eps: float = 1e-5, act_bits: int = 8,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_features, out_features, weight_eps=weight_eps, act_eps=act_eps,
                         act_bits=act_bits, device=device, dtype=dtype)
        self.arenas = arenas
        # ε, a tensor so that torch.compile does not recompile as it changes; set by the trainer
        # each step (set_arenas), used in train mode only
        self.register_buffer("arenas_eps", torch.zeros((), device=device), persistent=False)

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        """What this class's constructor sets beyond BitLinear's (hgf.model.init.reset_own)."""
        self.arenas_eps.zero_()

    def ternary(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return sherry_ternarize(self.weight if weight is None else weight, self.weight_eps)

    def quantized_weight(self) -> torch.Tensor:
        t, s = self.ternary()
        return self.weight + (t / s - self.weight).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.ternary()
        y = ste_linear(x, self.weight, t.div_(s), self.act_eps, self.act_bits)
        if self.training and self.arenas:
            y = y + self.arenas_eps.to(y.dtype) * F.linear(x, self.weight.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sherry 3:4, arenas={self.arenas}"


def sherry_layers(model: nn.Module) -> list[SherryLinear]:
    return [m for m in model.modules() if isinstance(m, SherryLinear)]


def set_arenas(model: nn.Module, eps: float) -> None:
    """Set the Arenas ε of every SherryLinear of ``model``."""
    for m in sherry_layers(model):
        m.arenas_eps.fill_(float(eps))
