import torch

from hgf.model.quant import BitLinear, act_quant, ternarize, weight_scale


def test_ternarize_hand_example():
    w = torch.tensor([[0.5, -1.5, 0.1], [2.0, 0.0, -0.2]])
    # mean|W| = (0.5+1.5+0.1+2.0+0.0+0.2)/6 = 4.3/6
    s = 6 / 4.3
    w_t, scale = ternarize(w)
    assert torch.isclose(scale, torch.tensor(s))
    # W·s = [0.698, -2.093, 0.140; 2.791, 0, -0.279] -> round, clamp
    assert torch.equal(w_t, torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert scale.dtype == torch.float32


def test_ternarize_all_zero_tensor_no_nan():
    w_t, s = ternarize(torch.zeros(4, 3))
    assert torch.equal(w_t, torch.zeros(4, 3))
    assert torch.isfinite(s) and s == 1e5  # 1 / clamp(0, 1e-5)


def test_act_quant_hand_example_and_range():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-4.0, 2.0, 1.0, 3.0]])
    q, s = act_quant(x)
    assert torch.equal(s[0], torch.tensor([127.0]))
    assert torch.equal(q[0], torch.tensor([127.0, -64.0, 32.0, 0.0]))  # round(-63.5) = -64 (half-even)
    assert torch.equal(q[1], torch.zeros(4)) and torch.isfinite(s[1]).all()  # token of zeros
    assert torch.isclose(s[2], torch.tensor([127 / 4.0])).all()
    assert torch.equal(q[2], torch.tensor([-127.0, 64.0, 32.0, 95.0]))
    big = torch.randn(64, 33) * 100
    qb, _ = act_quant(big)
    assert qb.min() >= -128 and qb.max() <= 127
    assert torch.equal(qb, qb.round())


def test_weight_scale_float32_under_bf16():
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    assert weight_scale(w).dtype == torch.float32
    _, s = act_quant(torch.randn(2, 8, dtype=torch.bfloat16))
    assert s.dtype == torch.float32


def test_bitlinear_forward_matches_manual_and_ste_passes_gradients():
    lin = BitLinear(6, 5)
    x = torch.randn(3, 6, requires_grad=True)
    y = lin(x)
    w_t, s_w = ternarize(lin.weight)
    x_int, s_x = act_quant(x)
    ref = (x_int @ w_t.T) / (s_x * s_w)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    # STE: d/dx of (x_q @ W_qᵀ) is identity through the quantizer -> W_q summed over outputs
    torch.testing.assert_close(x.grad, (w_t / s_w).sum(0).expand(3, 6), rtol=1e-5, atol=1e-6)
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    x_q = x_int / s_x
    torch.testing.assert_close(lin.weight.grad, x_q.sum(0).expand(5, 6), rtol=1e-5, atol=1e-6)


def test_bitlinear_zero_input_and_zero_weight_no_nan():
    lin = BitLinear(4, 3)
    torch.nn.init.zeros_(lin.weight)
    y = lin(torch.zeros(2, 4, requires_grad=True))
    assert torch.isfinite(y).all() and torch.equal(y, torch.zeros(2, 3))
