"""The one ``make_linear`` factory used while a model is built, and the projection registry.

Every projection in a block gets a role name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj). ``model.linear`` picks the kind for every block projection; ``hgf.targets`` decides
which projections of an ``hgf`` model carry a correction (the others are plain BitLinear).
Embeddings and the LM head never go through this factory: they stay full precision.

The rank rule lives here too, beside the projections it counts: ``hgf.rank``, or the largest rank
whose correction stays within ``hgf.target_overhead`` of the packed ternary backbone
(docs/METHOD.md §5; hgf.memory reports the same bytes for a built model).

Adding a linear kind (docs/STYLE.md §13): write the layer class with its ``hgf_role`` and
``hgf_param_roles`` (hgf.model.roles says what they mean and what reads them), and add its
factory to ``LINEARS``; ``model.linear`` accepts it from then on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from hgf.config import Config, HGFConfig, kv_heads
from hgf.model.hgf_linear import HGFLinear
from hgf.model.ptqtp import PTQTPLinear
from hgf.model.quant import BitLinear
from hgf.model.sherry import SherryLinear
from hgf.model.tequila import TequilaLinear

FP16 = 2  # bytes per value of the correction A, B and the gates (and of hgf.memory's FP16 parts)
SCALE_BYTES = 4  # one float32 scale per packed ternary tensor
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
TARGETS = {"attention": ATTENTION_PROJ, "mlp": MLP_PROJ, "all": ATTENTION_PROJ + MLP_PROJ}


def _dense(i: int, o: int, cfg: Config, rank: int) -> nn.Module:
    return nn.Linear(i, o, bias=False)


def _bitlinear(i: int, o: int, cfg: Config, rank: int) -> nn.Module:
    q = cfg.quant
    return BitLinear(i, o, weight_eps=q.weight_eps, act_eps=q.act_eps, act_bits=q.act_bits)


def _hgf(i: int, o: int, cfg: Config, rank: int) -> nn.Module:
    q, h = cfg.quant, cfg.hgf
    return HGFLinear(
        i, o, rank=rank, gate=h.gate, gate_init=h.gate_init, fusion=h.fusion,
        gate_mode=h.gate_mode,
        weight_eps=q.weight_eps, act_eps=q.act_eps, act_bits=q.act_bits,
    )


def _tequila(i: int, o: int, cfg: Config, rank: int) -> nn.Module:
    q, t = cfg.quant, cfg.tequila
    return TequilaLinear(i, o, bias_scale=t.bias_scale, learn_scale=t.learn_scale,
                         weight_eps=q.weight_eps, act_eps=q.act_eps, act_bits=q.act_bits)


def _sherry(i: int, o: int, cfg: Config, rank: int) -> nn.Module:
    q = cfg.quant
    return SherryLinear(i, o, arenas=cfg.sherry.arenas, weight_eps=q.weight_eps,
                        act_eps=q.act_eps, act_bits=q.act_bits)


def _ptqtp(i: int, o: int, cfg: Config, rank: int) -> nn.Module:
    q = cfg.quant
    return PTQTPLinear(i, o, activations=cfg.ptqtp.activations, act_eps=q.act_eps,
                       act_bits=q.act_bits)


LINEARS: dict[str, Callable[[int, int, Config, int], nn.Module]] = {
    "dense": _dense,
    "bitlinear": _bitlinear,
    "hgf": _hgf,
    "tequila": _tequila,
    "sherry": _sherry,
    "ptqtp": _ptqtp,  # two fixed trit-planes: made by `hgf convert --to ptqtp`, not trained
}


def linear_kind(role: str, cfg: Config) -> str:
    """Which registry entry a projection with this role gets under ``cfg``."""
    kind = cfg.model.linear
    if kind == "hgf" and role not in TARGETS[cfg.hgf.targets]:
        return "bitlinear"
    return kind


def make_linear(role: str, in_features: int, out_features: int, cfg: Config, rank: int) -> nn.Module:
    if role not in ATTENTION_PROJ + MLP_PROJ:
        raise ValueError(f"unknown projection role {role!r}")
    return LINEARS[linear_kind(role, cfg)](in_features, out_features, cfg, rank)


def corrected_roles(h: HGFConfig) -> tuple[str, ...]:
    return TARGETS[h.targets]


def block_projections(d_model: int, d_ff: int, kv_dim: int | None = None
                      ) -> list[tuple[str, int, int]]:
    """(role, in_features, out_features) of every projection in one block (both attentions);
    ``kv_dim`` = n_kv_heads × head_dim under grouped-query attention (default d_model)."""
    kv_dim = kv_dim or d_model
    return [
        ("q_proj", d_model, d_model),
        ("k_proj", d_model, kv_dim),
        ("v_proj", d_model, kv_dim),
        ("o_proj", d_model, d_model),
        ("gate_proj", d_model, d_ff),
        ("up_proj", d_model, d_ff),
        ("down_proj", d_ff, d_model),
    ]


def rank_for_overhead(cfg: Config, target: float, bits: float | None = None) -> int:
    """Largest rank r whose correction overhead (vs the ternary backbone at ``bits`` per weight,
    scales included, embeddings excluded) does not exceed ``target``, the gates paid for (one per
    projection, per output channel, or d_out + 1 for an input gate); at least 1."""
    m, h = cfg.model, cfg.hgf
    bits = h.overhead_bits if bits is None else bits
    projs = block_projections(m.d_model, m.d_ff, kv_heads(m) * (m.d_model // m.n_heads))
    backbone = m.n_layers * sum(i * o * bits / 8 + SCALE_BYTES for _, i, o in projs)
    targeted = [(i, o) for role, i, o in projs if role in TARGETS[h.targets]]
    per_rank = m.n_layers * FP16 * sum(i + o for i, o in targeted)
    per_gate = {"scalar": lambda o: 1, "channel": lambda o: o, "input": lambda o: o + 1}
    gates = m.n_layers * FP16 * sum(per_gate[h.gate_mode](o) for _, o in targeted)
    return max(1, math.floor((target * backbone - gates) / per_rank))


def resolve_rank(cfg: Config) -> int:
    """The correction rank of an ``hgf`` model: ``hgf.rank``, or from ``hgf.target_overhead``."""
    h = cfg.hgf
    return rank_for_overhead(cfg, h.target_overhead) if h.target_overhead > 0 else h.rank
