"""The packed runtime: PackedTernaryLinear equals the training layer at inference, and the packed
model is the same Transformer class with buffer-only projections swapped in."""

from __future__ import annotations

import pytest
import torch

from hgf.infer import PackedTernaryLinear, export_model, load_packed
from hgf.model import BitLinear, HGFLinear, Transformer
from infer_utils import train_tiny

# Same int8 codes and ternary weights, only the float order of operations differs:
# (x_int @ W_tᵀ)/(s_x·s_w) vs (x_int/s_x) @ (W_t/s_w)ᵀ, so the outputs agree to float32 rounding.
LAYER_RTOL = 1e-5  # of max |y|


def _fp16_exact_(layer: HGFLinear) -> None:
    """Make A and g·B exactly representable in FP16, so storage adds no error."""
    with torch.no_grad():
        g = layer.gate_value()
        layer.A.copy_(layer.A.half().float())
        layer.B.copy_((g * torch.randn_like(layer.B) * 0.2).half().float() / g)


@pytest.mark.parametrize("packing", ["i2", "tq1"])
@pytest.mark.parametrize("kind", ["bitlinear", "hgf_additive", "hgf_convex"])
def test_packed_linear_equals_training_layer(kind: str, packing: str) -> None:
    in_f, out_f = 150, 42  # not multiples of 4 or 5 or 64: exercises row padding
    if kind == "bitlinear":
        layer = BitLinear(in_f, out_f)
    else:
        layer = HGFLinear(in_f, out_f, rank=6, gate_init=0.3, fusion=kind.split("_")[1])
        _fp16_exact_(layer)
    x = torch.randn(3, 7, in_f) * 2
    packed = PackedTernaryLinear.from_training(layer, packing)
    with torch.no_grad():
        want, got = layer(x), packed(x)
    assert got.shape == want.shape == (3, 7, out_f)
    assert (got - want).abs().max() <= LAYER_RTOL * want.abs().max()


def test_packed_linear_has_no_float_weight() -> None:
    layer = HGFLinear(64, 32, rank=4)
    packed = PackedTernaryLinear.from_training(layer, "i2")
    assert list(packed.parameters()) == []  # buffer-only
    bufs = dict(packed.named_buffers())
    assert set(bufs) == {"weight_packed", "weight_scale", "A_t", "B_t"}
    assert bufs["A_t"].shape == (64, 4) and bufs["B_t"].shape == (4, 32)
    assert bufs["weight_packed"].dtype == torch.uint8 and bufs["weight_packed"].shape == (32, 16)


def test_convex_gate_one_is_refused() -> None:
    layer = HGFLinear(16, 8, rank=2, gate="raw", gate_init=1.0, fusion="convex")
    with pytest.raises(Exception, match="convex fusion with gate g=1"):
        PackedTernaryLinear.from_training(layer, "i2")


@pytest.mark.parametrize("arm", ["hgf", "bitnet", "diff_only"])
def test_packed_model_is_the_same_transformer(arm: str, tmp_path) -> None:
    model, cfg, _ = train_tiny(arm)
    export_model(model, cfg, tmp_path / "m.hgf")
    packed, header = load_packed(tmp_path / "m.hgf")
    assert type(packed) is Transformer and header.config == cfg
    n_ternary = sum(isinstance(m, BitLinear) for m in model.modules())
    assert not any(isinstance(m, BitLinear) for m in packed.modules())
    assert sum(isinstance(m, PackedTernaryLinear) for m in packed.modules()) == n_ternary
    assert not any(t.is_meta for t in [*packed.parameters(), *packed.buffers()])
    # every ternary weight lives only as packed bytes (no float copy anywhere)
    float_params = sum(p.numel() for p in packed.parameters())
    train_ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    train_other = sum(p.numel() for p in model.parameters()) - train_ternary
    train_other -= sum(1 for m in model.modules() if isinstance(m, HGFLinear))  # gates folded
    train_other -= sum(m.A.numel() + m.B.numel() for m in model.modules()
                       if isinstance(m, HGFLinear))  # A, B' are buffers
    assert float_params == train_other
