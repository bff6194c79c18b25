"""Model zoo: one decoder, orthogonal linear (dense | bitlinear | hgf) and attention
(standard | differential) axes; the role of every module and parameter (hgf.model.roles)."""

from hgf.model.attention import DifferentialAttention, KVCache, StandardAttention
from hgf.model.hgf_linear import (
    HGFLinear,
    gate_clamp_at,
    gate_l2_penalty,
    gate_ranges,
    gate_values,
    gates_frozen_at,
    hgf_layers,
    set_gate_max,
)
from hgf.model.linear import LINEARS, linear_kind, make_linear
from hgf.model.params import param_groups, param_kind
from hgf.model.quant import BitLinear, act_quant, ternarize, weight_scale
from hgf.model.roles import modules_with_role, param_roles, role_of
from hgf.model.transformer import Transformer, build_model, lm_loss

__all__ = [
    "BitLinear", "DifferentialAttention", "HGFLinear", "KVCache", "LINEARS", "StandardAttention",
    "Transformer", "act_quant", "build_model", "gate_clamp_at", "gate_l2_penalty", "gate_ranges",
    "gate_values", "gates_frozen_at", "hgf_layers", "linear_kind", "lm_loss", "make_linear",
    "modules_with_role", "param_groups", "param_kind", "param_roles", "role_of", "set_gate_max",
    "ternarize", "weight_scale",
]
