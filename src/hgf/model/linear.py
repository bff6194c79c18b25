"""The one ``make_linear`` factory used while a model is built, and the projection registry.

Every projection in a block gets a role name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj). ``model.linear`` picks the kind for every block projection; ``hgf.targets`` decides
which projections of an ``hgf`` model carry a correction (the others are plain BitLinear).
Embeddings and the LM head never go through this factory: they stay full precision.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hgf.config import Config, HGFConfig
from hgf.model.hgf_linear import HGFLinear
from hgf.model.quant import BitLinear
from hgf.model.sherry import SherryLinear
from hgf.model.tequila import TequilaLinear

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


LINEARS: dict[str, Callable[[int, int, Config, int], nn.Module]] = {
    "dense": _dense,
    "bitlinear": _bitlinear,
    "hgf": _hgf,
    "tequila": _tequila,
    "sherry": _sherry,
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
