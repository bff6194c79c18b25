"""hgf.gate_mode: one gate per projection (scalar, the default), per output channel, or per token
from the ternary stream's output (input); the fusion forms, the fold at export, the memory count
and the gate statistics for each (docs/METHOD.md §3)."""

from __future__ import annotations

import pytest
import torch

from hgf.config import Config, build_config
from hgf.errors import HGFError
from hgf.memory import memory_report, rank_for_overhead
from hgf.model import build_model, gate_l2_penalty, gate_ranges, gate_values, hgf_layers
from hgf.model.hgf_linear import HGFLinear, gate_stats
from hgf.model.quant import BitLinear

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures


def _layer(mode: str, fusion: str = "additive", **kw) -> HGFLinear:
    torch.manual_seed(0)
    layer = HGFLinear(16, 12, rank=4, gate_mode=mode, fusion=fusion, gate_init=0.3, **kw)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def _ternary(layer: HGFLinear, x: torch.Tensor) -> torch.Tensor:
    bit = BitLinear(layer.in_features, layer.out_features)
    bit.load_state_dict({"weight": layer.weight.detach().clone()})
    return bit(x)


def test_default_is_one_scalar_gate():
    layer = HGFLinear(16, 12, rank=4)
    assert layer.gate_mode == "scalar" and layer.gate.shape == ()
    assert not hasattr(layer, "gate_w")
    assert Config().hgf.gate_mode == "scalar"


@pytest.mark.parametrize("fusion", ["additive", "convex"])
def test_channel_gates_all_equal_are_the_scalar_gate(fusion):
    scalar, channel = _layer("scalar", fusion), _layer("channel", fusion)
    channel.load_state_dict({**scalar.state_dict(), "gate": scalar.gate.detach().expand(12)})
    assert channel.gate.shape == (12,)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = scalar(x), channel(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad)
    for name in ("weight", "A", "B"):
        torch.testing.assert_close(getattr(channel, name).grad, getattr(scalar, name).grad)
    torch.testing.assert_close(channel.gate.grad.sum(), scalar.gate.grad)  # split per channel


@pytest.mark.parametrize("mode", ["scalar", "channel", "input"])
@pytest.mark.parametrize("fusion", ["additive", "convex"])
def test_every_gate_mode_keeps_the_fusion_form(mode, fusion):
    layer = _layer(mode, fusion)
    with torch.no_grad():
        layer.gate.add_(torch.randn_like(layer.gate))
        if mode == "input":
            layer.gate_w.normal_(std=0.3)
    x = torch.randn(3, 5, 16)
    t, c = _ternary(layer, x), layer.correction(x)
    if mode == "input":
        g = torch.sigmoid(t @ layer.gate_w + layer.gate)[..., None]  # [3, 5, 1] per token
    else:
        g = torch.sigmoid(layer.gate)  # [] or [12]
    want = t + g * c if fusion == "additive" else (1 - g) * t + g * c
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_input_gate_starts_as_the_scalar_gate():
    scalar, inp = _layer("scalar"), _layer("input")
    inp.load_state_dict(scalar.state_dict(), strict=False)
    assert torch.equal(inp.gate_w, torch.zeros(12))
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(inp(x), scalar(x), rtol=1e-6, atol=1e-6)


def test_input_gate_shapes_and_gradients():
    layer = _layer("input")
    with torch.no_grad():
        layer.gate_w.normal_(std=0.3)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 7, 12)
    assert layer.input_gate(_ternary(layer, x)).shape == (2, 7, 1)
    y.square().sum().backward()
    shapes = {n: p.grad.shape for n, p in layer.named_parameters()}
    assert shapes == {"weight": (12, 16), "A": (4, 16), "B": (12, 4), "gate": (),
                      "gate_w": (12,)}
    assert x.grad.shape == x.shape and layer.gate_w.grad.abs().sum() > 0
    mean, lo, hi = gate_stats(layer)  # the last forward's per-token gates
    assert 0 < lo <= mean <= hi < 1 and lo < hi

    # the gate path is smooth: numerical = analytic gradients of w, α, A, B (double precision;
    # x and the ternary weight fixed, so the straight-through quantizer plays no part)
    layer = layer.double()
    xd = torch.randn(2, 3, 16, dtype=torch.double)
    with torch.no_grad():
        t = BitLinear.forward(layer, xd)  # [2, 3, 12] the ternary stream

    def reference(w, a, A, B):
        g = torch.sigmoid(t @ w + a)[..., None]  # [2, 3, 1]
        return t + g * (xd @ A.T @ B.T)

    def call(w, a, A, B):
        return torch.func.functional_call(layer, {"gate_w": w, "gate": a, "A": A, "B": B}, (xd,))

    inputs = tuple(p.detach().clone().requires_grad_()
                   for p in (layer.gate_w, layer.gate, layer.A, layer.B))
    torch.testing.assert_close(call(*inputs), reference(*inputs))
    assert torch.autograd.gradcheck(call, inputs, eps=1e-6, atol=1e-5)


def test_channel_gates_fold_into_b_rows():
    layer = _layer("channel")
    with torch.no_grad():
        layer.gate.copy_(torch.linspace(-3, 1, 12))
    A, B, a = layer.folded_terms()
    g = torch.sigmoid(layer.gate.detach())
    assert torch.equal(B, g[:, None] * layer.B.detach()) and float(a) == 1.0
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), a * _ternary(layer, x) + x @ A.T @ B.T)


def test_what_cannot_be_folded_is_refused_in_one_line():
    with pytest.raises(HGFError, match="gate_mode=input: the gate depends on each token"):
        _layer("input").folded_terms()
    convex = _layer("channel", "convex")
    with torch.no_grad():
        convex.gate.copy_(torch.linspace(-3, 1, 12))
    with pytest.raises(HGFError, match="one scale per tensor"):
        convex.folded_terms()
    same = _layer("channel", "convex")  # all channels equal: one scale, folds as a scalar gate
    A, B, a = same.folded_terms()
    assert float(a) == pytest.approx(0.7) and a.dim() == 0


def _cfg(mode: str, **hgf) -> Config:
    return build_config(({"model": {"linear": "hgf", "vocab_size": 64},
                          "hgf": {"gate_mode": mode, "rank": 2, "targets": "attention", **hgf}},
                         "test"))


def test_memory_counts_the_gates_of_each_mode():
    d = Config().model.d_model
    per_projection = {"scalar": 1, "channel": d, "input": d + 1}  # Q/K/V/O are d → d here
    for mode, n in per_projection.items():
        cfg = _cfg(mode)
        rep = memory_report(build_model(cfg, device="meta"))
        assert rep.n_gates == cfg.model.n_layers * 4 * n, mode
        # the rank derived from a target overhead pays for the gates too
        r = rank_for_overhead(cfg, 0.4)
        sized = memory_report(build_model(_cfg(mode, rank=r), device="meta"))
        assert sized.overhead("i2") <= 0.4 < memory_report(
            build_model(_cfg(mode, rank=r + 1), device="meta")).overhead("i2")


def test_gate_statistics_and_l2_pull_handle_vectors():
    model = build_model(_cfg("channel", gate_init=0.2))
    q = model.layers[0].attn.q_proj
    with torch.no_grad():
        q.gate.copy_(torch.logit(torch.linspace(0.1, 0.5, q.out_features)))
    vals, ranges = gate_values(model), gate_ranges(model)
    name = "layers.0.attn.q_proj"
    assert vals[name] == pytest.approx(0.3, abs=1e-6)
    assert ranges[name] == pytest.approx({"min": 0.1, "max": 0.5}, abs=1e-6)
    assert set(ranges) == set(vals) == {n for n, _ in hgf_layers(model)}
    # the L2 pull is elementwise: every channel is pulled as a scalar gate would be
    want = sum(((m.gate_value() - 0.1) ** 2).sum() for _, m in hgf_layers(model))
    torch.testing.assert_close(gate_l2_penalty(model, 0.1), want)
    assert gate_ranges(build_model(_cfg("scalar"))) == {}


def test_packed_logits_of_a_channel_gated_model_equal_the_model(tmp_path):
    from hgf.infer import export_model, load_packed
    from infer_utils import train_tiny

    model, cfg, _ = train_tiny("hgf", 20, ("--hgf.gate_mode=channel",))
    q = model.layers[0].attn.q_proj
    assert q.gate.shape == (q.out_features,) and float(q.gate.std()) > 0  # trained apart
    export_model(model, cfg, tmp_path / "m.hgf")
    packed, _ = load_packed(tmp_path / "m.hgf")
    x = torch.randint(0, cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        want, got = model(x), packed(x)
    # FP16 storage of A and g·B is the only difference
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("mode", ["channel", "input"])
def test_trainer_clamps_freezes_and_logs_vector_gates(mode, tmp_path, dataset, one_thread):
    import json

    from hgf.data import prepare
    from hgf.train import build_trainer, train
    from trainkit import tiny_config

    cfg = tiny_config(tmp_path, dataset, "hgf", "--train.steps=8", "--train.lr=1e-2",
                      f"--hgf.gate_mode={mode}", "--hgf.gate_warmup_frac=0.5",
                      "--hgf.gate_l2=10", "--hgf.gate_target=0.9", "--hgf.gate_lr_mult=10",
                      "--hgf.gate_freeze_frac=0.75")
    tr = build_trainer(cfg, prepare(cfg, progress=False).tokens("train"), torch.device("cpu"))
    gates = [p for _, m in hgf_layers(tr.model) for p in (m.gate, getattr(m, "gate_w", None))
             if p is not None]
    for step in range(8):
        tr.train_step(step)
        if step < 4:  # warmup: every gate (channel, token) under the clamp
            clamp = tr.gates.clamp_at(step)
            assert all(gate_stats(m)[2] <= clamp + 1e-6 for _, m in hgf_layers(tr.model))
        if step == 5:
            frozen = [p.detach().clone() for p in gates]
        if step > 5:
            assert all(torch.equal(p, f) for p, f in zip(gates, frozen, strict=True))
    train(cfg)  # the metrics log carries each projection's mean and its min/max
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in recs if r.get("kind") == "train" and "gates" in r)
    name = next(iter(rec["gates"]))
    lo, hi = rec["gate_range"][name]["min"], rec["gate_range"][name]["max"]
    assert lo - 1e-6 <= rec["gates"][name] <= hi + 1e-6
