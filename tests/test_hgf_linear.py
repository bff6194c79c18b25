import math

import pytest
import torch

from hgf.model.hgf_linear import (
    NO_CLAMP,
    HGFLinear,
    gate_clamp_at,
    gate_l2_penalty,
    gate_values,
    gates_frozen_at,
    set_gate_max,
)
from hgf.model.quant import BitLinear


def _pair(**kw):
    hgf = HGFLinear(16, 12, rank=4, **kw)
    bit = BitLinear(16, 12)
    bit.load_state_dict({"weight": hgf.weight.detach().clone()})
    return hgf, bit


def test_b_zero_equals_bitlinear_bit_for_bit():
    hgf, bit = _pair()
    x = torch.randn(5, 7, 16)
    assert torch.equal(hgf(x), bit(x))


def test_nonzero_b_differs_by_exactly_gated_correction():
    hgf, bit = _pair()
    with torch.no_grad():
        hgf.B.normal_()
    x = torch.randn(3, 16)
    g = torch.sigmoid(hgf.gate)
    expected = bit(x) + g * (x @ hgf.A.T @ hgf.B.T)
    torch.testing.assert_close(hgf(x), expected, rtol=1e-6, atol=1e-6)


def test_convex_fusion():
    hgf, bit = _pair(fusion="convex")
    with torch.no_grad():
        hgf.B.normal_()
    x = torch.randn(3, 16)
    g = hgf.gate_value()
    torch.testing.assert_close(hgf(x), (1 - g) * bit(x) + g * hgf.correction(x))


@pytest.mark.parametrize("fusion", ["additive", "convex"])
def test_folded_terms_reproduce_the_layer(fusion):
    hgf, bit = _pair(fusion=fusion)
    with torch.no_grad():
        hgf.B.normal_()
    with torch.no_grad():  # plain numbers to compare (float() of a grad tensor warns)
        A, B, a = hgf.folded_terms()
        g = hgf.gate_value()
    assert torch.equal(B, g * hgf.B) and torch.equal(A, hgf.A)
    assert float(a) == (float(1 - g) if fusion == "convex" else 1.0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(hgf(x), a * bit(x) + x @ A.T @ B.T)


def test_folded_terms_refuse_a_convex_gate_of_one():
    from hgf.errors import HGFError

    hgf = HGFLinear(16, 12, rank=4, fusion="convex", gate="raw", gate_init=1.0)
    with pytest.raises(HGFError, match="cannot be folded"):
        hgf.folded_terms()


@pytest.mark.parametrize("kind,init", [("sigmoid", 0.1), ("sigmoid", 0.7), ("raw", 0.1),
                                       ("raw", -0.3), ("tanh", 0.1), ("tanh", -0.5)])
def test_gate_parameterizations_hit_init(kind, init):
    layer = HGFLinear(8, 8, rank=2, gate=kind, gate_init=init)
    assert math.isclose(float(layer.gate_value().detach()), init, rel_tol=1e-6, abs_tol=1e-7)
    assert layer.gate.shape == ()  # one scalar per projection


def test_gate_clamp_and_helpers():
    model = torch.nn.Sequential(HGFLinear(8, 8, rank=2, gate_init=0.5), HGFLinear(8, 8, rank=2))
    set_gate_max(model, 0.2)
    vals = gate_values(model)
    assert vals == pytest.approx({"0": 0.2, "1": 0.1})
    set_gate_max(model, NO_CLAMP)
    assert gate_values(model)["0"] == pytest.approx(0.5)
    pen = gate_l2_penalty(model, 0.1)
    assert float(pen.detach()) == pytest.approx(0.4**2)
    pen.backward()
    assert model[0].gate.grad is not None and model[0].gate.grad != 0


def test_gate_schedule_functions():
    assert gate_clamp_at(0, 100, 0.1, 0.2) == pytest.approx(0.1)
    assert gate_clamp_at(10, 100, 0.1, 0.2) == pytest.approx(0.55)
    assert gate_clamp_at(20, 100, 0.1, 0.2) == NO_CLAMP
    assert gate_clamp_at(5, 100, 0.1, 0.0) == NO_CLAMP
    assert not gates_frozen_at(79, 100, 0.8) and gates_frozen_at(80, 100, 0.8)
    assert not gates_frozen_at(10**6, 100, 1.0)


def test_svd_init_reduces_quantization_error():
    torch.manual_seed(1)
    layer = HGFLinear(32, 24, rank=8)
    from hgf.model.quant import ternarize

    w_t, s = ternarize(layer.weight)
    resid = layer.weight - w_t / s
    layer.init_from_residual_svd()
    fix = layer.gate_value() * layer.B @ layer.A
    assert torch.linalg.norm(resid - fix) < 0.9 * torch.linalg.norm(resid)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        HGFLinear(4, 4, rank=0)
