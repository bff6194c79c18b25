"""The registries (docs/STYLE.md §13): packings, module and parameter roles, arms, and the config
choices read from them."""

from pathlib import Path

import pytest
import torch
from torch import nn

from hgf.config import ARMS, CHOICES, SIZES, choices, config_from_dict, load_config
from hgf.gguf.export import PACKING_TYPES
from hgf.infer.format import expected_tensors
from hgf.kernels.packing import (
    ACCOUNTED,
    PACKING_REGISTRY,
    PACKINGS,
    get_packing,
    pack_ternary,
    packed_shape,
    row_bytes,
    unpack_ternary,
)
from hgf.memory import BITS, memory_report, packed_bytes
from hgf.model.attention import ATTENTIONS
from hgf.model.hgf_linear import GATE_FORWARD, HGFLinear
from hgf.model.linear import LINEARS, TARGETS
from hgf.model.params import KIND_OF_ROLE, param_kind
from hgf.model.quant import BitLinear
from hgf.model.roles import MODULE_ROLES, PARAM_ROLES, param_roles, role_of
from hgf.model.transformer import build_model

ROOT = Path(__file__).resolve().parents[1]
IN_SIZES = [1, 3, 4, 5, 6, 63, 64, 255, 256, 257, 320, 321, 1000]


# ---------------------------------------------------------------------------------------------
# Packings


def test_storable_and_accounted_packings():
    assert PACKINGS == ("i2", "tq1", "sherry") and ACCOUNTED == ("i2", "tq1", "sherry", "entropy")
    assert all(PACKING_REGISTRY[p].storable for p in PACKINGS)
    assert not PACKING_REGISTRY["entropy"].storable
    with pytest.raises(ValueError, match="unknown packing 'entropy'"):
        get_packing("entropy")
    with pytest.raises(ValueError, match="known: i2, tq1, sherry"):
        row_bytes(8, "fp4")


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("in_f", IN_SIZES)
def test_row_bytes_match_the_packer(packing, in_f):
    p = PACKING_REGISTRY[packing]
    w = torch.randint(-1, 2, (3, in_f))
    w[0] = 1  # the largest code everywhere in one row
    if p.sparsity == "3:4":  # sherry: groups of 4 weights with one zero each
        if in_f % 4:
            with pytest.raises(ValueError, match="multiple of 4"):
                p.row_bytes(in_f)
            return
        w = torch.randint(0, 2, (3, in_f)) * 2 - 1
        w.view(3, in_f // 4, 4)[:, :, 0] = 0
        w.view(3, in_f // 4, 4)[1:, :, 1:] *= -1
    packed = pack_ternary(w, packing)
    assert tuple(packed.shape) == (3, p.row_bytes(in_f)) == packed_shape(3, in_f, packing)
    assert packed.numel() == p.tensor_bytes(3, in_f) == packed_bytes(3, in_f, packing)
    assert int(packed.max()) <= p.max_byte
    assert torch.equal(unpack_ternary(packed, packing, 3, in_f), w.to(torch.int8))
    # the bits a row costs, padding aside (sherry: full blocks of 128 weights exactly)
    if p.codec is None:
        assert p.row_bytes(in_f) * 8 >= in_f * p.bits > (p.row_bytes(in_f) - 1) * 8
    else:
        assert p.row_bytes(in_f) * 8 >= in_f * p.bits
        assert p.row_bytes(128 * in_f) * 8 == 128 * in_f * p.bits


def test_packing_constants():
    for p in PACKING_REGISTRY.values():
        assert BITS[p.name] == p.bits
        if p.storable and p.codec is None:  # a digit code
            assert p.bits == 8 / p.codes_per_byte
            assert p.base ** p.codes_per_byte <= 256 and p.base >= 3  # three codes fit a digit
    assert packed_bytes(2, 8, "entropy") == pytest.approx(16 * PACKING_REGISTRY["entropy"].bits / 8)


def test_gguf_types_come_from_the_registry():
    for p in (p for p in PACKINGS if PACKING_REGISTRY[p].gguf_type):  # not sherry
        assert PACKING_TYPES[p] == PACKING_REGISTRY[p].gguf_type
        assert PACKING_TYPES[PACKING_REGISTRY[p].gguf_type.lower()] == PACKING_REGISTRY[p].gguf_type


# ---------------------------------------------------------------------------------------------
# Roles


def _arm_model(arm: str, *extra: str):
    cfg = load_config(ROOT / "configs" / f"{arm}.toml",
                      [f"--model.{k}={v}" for k, v in SIZES["debug"].items()]
                      + ["--model.size=debug", "--train.seq_len=32", *extra])
    return build_model(cfg, device="meta"), cfg


@pytest.mark.parametrize("extra", [(), ("--model.tie_embeddings=false", "--hgf.targets=attention")])
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_module_and_parameter_of_every_arm_has_a_role(arm, extra):
    model, cfg = _arm_model(arm, *extra)
    seen_roles = set()
    for name, mod in model.named_modules():
        role = role_of(name, mod)
        assert role in MODULE_ROLES, (name, role)
        if isinstance(mod, BitLinear):
            assert role == "ternary"
        elif name == "lm_head":
            assert role == "head"
        elif isinstance(mod, nn.Linear):
            assert role == "dense"
        elif isinstance(mod, nn.Embedding):
            assert role == "embedding"
    for mod_name, mod, p_name, _, role in param_roles(model, dedup=False):
        assert role in PARAM_ROLES, (mod_name, p_name, role)
        seen_roles.add(role)
        if isinstance(mod, HGFLinear) and p_name in ("A", "B"):
            assert role == "correction"
        if isinstance(mod, HGFLinear) and p_name == "gate":
            assert role == "gate"
    linear = ARMS[arm][0]
    assert ("ternary" in seen_roles) == (linear != "dense")
    assert ("dense" in seen_roles) == (linear == "dense")
    assert ("correction" in seen_roles) == ("gate" in seen_roles) == (linear == "hgf")
    # every consumer knows every role it meets
    kinds = param_kind(model)
    assert set(kinds.values()) <= set(KIND_OF_ROLE.values())
    assert set(kinds) == {f"{m}.{p}" if m else p for m in dict(model.named_modules())
                          for p, _ in model.get_submodule(m).named_parameters(recurse=False)}
    rep = memory_report(model)
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    specs = expected_tensors(model, cfg, "i2", "fp16")
    n_ternary = sum(1 for _, m in model.named_modules() if isinstance(m, BitLinear))
    assert sum(s.role == "ternary" for s in specs.values()) == n_ternary == len(rep.ternary_shapes)


def test_a_new_layer_kind_takes_its_roles_from_its_class():
    class TwoPlane(BitLinear):  # a made-up kind: a second ternary plane and a per-channel gate
        hgf_param_roles = {"weight": "ternary", "weight2": "ternary", "gate": "gate"}

        def __init__(self):
            super().__init__(8, 4)
            self.weight2 = nn.Parameter(torch.zeros(4, 8))
            self.gate = nn.Parameter(torch.zeros(4))

    model = nn.Sequential(TwoPlane())
    roles = {f"{m}.{p}": r for m, _, p, _, r in param_roles(model)}
    assert roles == {"0.weight": "ternary", "0.weight2": "ternary", "0.gate": "gate"}
    rep = memory_report(model)
    assert rep.ternary_shapes == [(4, 8), (4, 8)] and rep.n_gates == 4


# ---------------------------------------------------------------------------------------------
# Config choices and arms


def test_config_choices_are_the_registries():
    c = choices()
    assert c["model.linear"] == tuple(LINEARS) == ("dense", "bitlinear", "hgf", "tequila", "sherry",
                                                   "ptqtp")
    assert c["model.attention"] == tuple(ATTENTIONS) == ("standard", "differential")
    assert c["hgf.targets"] == tuple(TARGETS) and c["hgf.gate"] == tuple(GATE_FORWARD)
    assert set(CHOICES) < set(c)
    with pytest.raises(ValueError, match="model.linear.*must be one of dense, bitlinear, hgf"):
        config_from_dict({"model": {"linear": "ternary"}}, "test")


def test_arms_are_the_presets():
    for arm, axes in ARMS.items():
        cfg = load_config(ROOT / "configs" / f"{arm}.toml")
        assert (cfg.model.linear, cfg.model.attention) == axes
