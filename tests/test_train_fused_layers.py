"""The fused training forward/backward of BitLinear and HGFLinear against the plain STE reference
(``F.linear`` over the STE-wrapped operands, autograd through it): same values, same gradients
for x, W, A, B and the gate, for both fusions, also under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from hgf.model.hgf_linear import HGFLinear
from hgf.model.quant import BitLinear


def _reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = F.linear(layer.quantized_input(x), layer.quantized_weight())
    if not isinstance(layer, HGFLinear):
        return t
    g = layer.gate_value().to(t.dtype)
    c = layer.correction(x).to(t.dtype)
    return (1 - g) * t + g * c if layer.fusion == "convex" else t + g * c


def _grads(layer, x, fn, gy):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(layer, x)
    y.backward(gy)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("kind", ["bitlinear", "additive", "convex"])
def test_fused_matches_ste_reference(kind):
    torch.manual_seed(1)
    if kind == "bitlinear":
        layer = BitLinear(24, 20)
    else:
        layer = HGFLinear(24, 20, rank=4, fusion=kind, gate_init=0.3)
        with torch.no_grad():
            layer.B.normal_(0, 0.1)
    x, gy = torch.randn(3, 5, 24), torch.randn(3, 5, 20)
    y_ref, gx_ref, gp_ref = _grads(layer, x, _reference, gy)
    y, gx, gp = _grads(layer, x, lambda m, v: m(v), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert gp.keys() == gp_ref.keys()
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_under_bf16_autocast_keeps_float32_grads():
    torch.manual_seed(2)
    layer = HGFLinear(32, 16, rank=4)
    with torch.no_grad():
        layer.B.normal_(0, 0.1)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = _reference(layer, x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in layer.parameters())
