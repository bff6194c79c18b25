"""Tequila and Sherry (docs/METHODS.md): the layers against their formulas written out here, the
sherry packing and its CPU kernel against the reference, training (loss falls, exact resume),
export (Tequila's folded bias, the sherry packing) and generation through the packed file (the
native decoder's own checks are in test_engine.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hgf.cli import main
from hgf.config import ConfigError, load_config
from hgf.errors import HGFError
from hgf.infer import export_model, generate, load_packed
from hgf.infer.format import read_header
from hgf.kernels import pack_ternary, packed_shape, ternary_linear, unpack_ternary
from hgf.kernels.reference import ternary_linear_reference
from hgf.memory import memory_report, packed_bytes
from hgf.model import build_model
from hgf.model.linear import make_linear
from hgf.model.sherry import SherryLinear, arenas_at, set_arenas, sherry_ternarize
from hgf.model.tequila import TequilaLinear
from hgf.train import train
from infer_utils import make_run, make_tokenizer, train_tiny
from test_kernels import have_compiler
from trainkit import tiny_config

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
ROOT = Path(__file__).resolve().parents[1]


def _act(x: torch.Tensor) -> torch.Tensor:
    """x_q = clamp(round(x · 127 / max|x|), -128, 127) / s_x, per token (BitNet, METHOD §3)."""
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


def _bitnet_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1), s


# ---------------------------------------------------------------------------------- Tequila


def test_tequila_forward_is_bitlinear_plus_the_dead_zone_bias():
    layer = TequilaLinear(16, 8, bias_scale=0.25)
    x = torch.randn(3, 5, 16)
    w = layer.weight.detach()
    w_t, s = _bitnet_ternary(w)
    bias = torch.stack([0.25 * sum(w[j, i] for i in range(16) if w_t[j, i] == 0)
                        for j in range(8)])  # b_j = λ Σ_{i ∈ dead zone} W[j, i]
    want = F.linear(_act(x), w_t / s) + bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert layer.bias_lambda.requires_grad is False and "bias_lambda" in layer.state_dict()


def test_tequila_gradient_reaches_the_dead_zone_weights():
    layer = TequilaLinear(16, 8, bias_scale=0.5)
    x = torch.randn(6, 16)
    gy = torch.randn(6, 8)
    layer(x).backward(gy)
    w_t, _ = _bitnet_ternary(layer.weight.detach())
    dead = (w_t == 0).float()
    want = gy.t() @ _act(x) + 0.5 * dead * gy.sum(0)[:, None]  # STE + λ ∂L/∂b on the dead zone
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-5, atol=1e-5)
    assert dead.sum() > 0


def test_tequila_learned_scale_and_config_keys():
    cfg = load_config(ROOT / "configs" / "tequila.toml", ["--tequila.learn_scale=true",
                                                          "--tequila.bias_scale=0.01"])
    layer = make_linear("q_proj", 16, 8, cfg, 0)
    assert isinstance(layer, TequilaLinear) and isinstance(layer.bias_lambda, torch.nn.Parameter)
    layer(torch.randn(4, 16)).sum().backward()
    assert float(layer.bias_lambda.detach()) == pytest.approx(0.01) and layer.bias_lambda.grad is not None


# ---------------------------------------------------------------------------------- Sherry


def test_sherry_ternarize_keeps_the_three_largest_of_every_four():
    w = torch.randn(5, 12)
    w[0, :4] = torch.tensor([0.3, -0.1, 0.1, -0.5])  # a tie: the first smallest |W| is dropped
    t, s = sherry_ternarize(w)
    kept = []
    for j in range(5):
        for g in range(3):
            grp = w[j, 4 * g:4 * g + 4]
            z = min(range(4), key=lambda k: (abs(grp[k].item()), k))
            for k in range(4):
                want = 0.0 if k == z else (1.0 if grp[k] >= 0 else -1.0)
                assert t[j, 4 * g + k] == want
                if k != z:
                    kept.append(abs(grp[k].item()))
    assert t[0, :4].tolist() == [1.0, 0.0, 1.0, -1.0]
    assert float(s) == pytest.approx(1 / (sum(kept) / len(kept)), rel=1e-5)
    assert ((t == 0).view(5, 3, 4).sum(-1) == 1).all()


def test_sherry_forward_with_arenas_while_training_only():
    layer = SherryLinear(16, 8)
    x = torch.randn(4, 16)
    w = layer.weight.detach()
    t, s = sherry_ternarize(w)
    plain = F.linear(_act(x), t / s)
    layer.arenas_eps.fill_(0.3)
    torch.testing.assert_close(layer(x), plain + 0.3 * F.linear(x, w), rtol=1e-5, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-6)
    off = SherryLinear(16, 8, arenas=False)
    off.weight.data.copy_(w)
    off.arenas_eps.fill_(0.3)
    torch.testing.assert_close(off(x), plain, rtol=1e-5, atol=1e-6)


def test_arenas_schedule():
    # linear warmup to ε_max over 10% of the steps, cosine to 0 at the end (steps are 0-based)
    assert arenas_at(0, 100) == pytest.approx(0.1)
    assert arenas_at(9, 100) == pytest.approx(1.0)
    assert arenas_at(54, 100) == pytest.approx(0.5)
    assert arenas_at(99, 100) == 0.0 and arenas_at(150, 100) == 0.0
    assert arenas_at(19, 100, 2.0, 0.2, 0.6) == pytest.approx(2.0)
    assert arenas_at(59, 100, 2.0, 0.2, 0.6) == 0.0
    assert arenas_at(39, 100, 2.0, 0.2, 0.6) == pytest.approx(1.0)


def test_sherry_config_checks_widths():
    with pytest.raises(ConfigError, match="model.d_ff"):
        load_config(ROOT / "configs" / "sherry.toml", ["--model.d_ff=198"])
    with pytest.raises(ConfigError, match="sherry.arenas_warmup_frac"):
        load_config(ROOT / "configs" / "sherry.toml", ["--sherry.arenas_warmup_frac=0.9",
                                                       "--sherry.arenas_end_frac=0.5"])


@pytest.mark.parametrize("arm", ["tequila", "sherry"])
@pytest.mark.parametrize("attention", ["standard", "differential"])
def test_arms_compose_with_both_attentions(arm, attention):
    cfg = load_config(ROOT / "configs" / f"{arm}.toml", [f"--model.attention={attention}"])
    model = build_model(cfg)
    kinds = {type(m) for m in model.modules()}
    assert (TequilaLinear if arm == "tequila" else SherryLinear) in kinds
    assert model(torch.randint(0, 100, (1, 8))).shape == (1, 8, cfg.model.vocab_size)


# ---------------------------------------------------------------------------------- packing


def _sherry_weights(out_f: int, in_f: int) -> torch.Tensor:
    return sherry_ternarize(torch.randn(out_f, in_f))[0]


def test_sherry_packing_layout_by_hand():
    # one row, 2 groups: [0, 1, -1, 1] -> z=0, non-zeros (+,-,+): s=0, idx = 0 | 1<<2 | 0<<3 = 4
    #                    [-1, -1, 1, 0] -> z=3, non-zeros (-,-,+): s=1, idx = 3 | 0 | 1<<3 = 11
    w = torch.tensor([[0, 1, -1, 1, -1, -1, 1, 0]])
    packed = pack_ternary(w, "sherry")
    # 2 groups: h = 1 index byte (group 0 low nibble, group 1 high nibble), 1 sign byte
    assert packed.tolist() == [[4 | 11 << 4, 0b10]]
    assert torch.equal(unpack_ternary(packed, "sherry", 1, 8), w.to(torch.int8))


@pytest.mark.parametrize("in_f", [4, 64, 128, 200, 384, 1000])
def test_sherry_pack_roundtrip_and_bytes(in_f):
    w = _sherry_weights(7, in_f)
    packed = pack_ternary(w, "sherry")
    assert tuple(packed.shape) == packed_shape(7, in_f, "sherry")
    assert packed.numel() == packed_bytes(7, in_f, "sherry")
    if in_f % 128 == 0:
        assert packed.numel() * 8 == 1.25 * 7 * in_f  # 5 bits per 4 weights
    assert torch.equal(unpack_ternary(packed, "sherry", 7, in_f), w.to(torch.int8))


def test_sherry_packing_refuses_weights_that_are_not_3_4_sparse():
    with pytest.raises(ValueError, match="exactly one zero"):
        pack_ternary(torch.tensor([[1, 0, 0, 1]]), "sherry")
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(2, 6), "sherry")


@pytest.mark.skipif(not have_compiler(), reason="no C++ compiler / ninja")
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_sherry_cpu_kernel_is_bit_exact(isa):
    from hgf.kernels import cpu

    assert cpu.load()
    before = cpu.isa()
    try:
        cpu.isa(isa)
        for out_f, in_f, m in [(3, 4, 1), (5, 64, 2), (9, 128, 1), (6, 200, 3), (13, 1024, 5)]:
            w = torch.randn(out_f, in_f)
            t, s = sherry_ternarize(w)
            packed = pack_ternary(t, "sherry")
            for dtype in (torch.float32, torch.bfloat16):
                x = (3 * torch.randn(2, m, in_f)).to(dtype)
                got = ternary_linear(x, packed, s, "sherry", out_f, in_f)
                want = ternary_linear_reference(x, packed, s, "sherry", out_f, in_f)
                assert torch.equal(got, want), (isa, out_f, in_f, dtype)
                ref = F.linear(_act(x.float()), t / s).to(dtype)  # the unpacked formula
                torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    finally:
        cpu.isa(before)


# ---------------------------------------------------------------------------------- training


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arm", ["tequila", "sherry"])
def test_training_loss_falls(arm, tmp_path, dataset):
    res = train(tiny_config(tmp_path, dataset, arm, "--train.steps=16", "--train.lr=3e-3"))
    losses = [res.losses[k] for k in sorted(res.losses)]
    assert losses[-1] < losses[0] - 0.3 and math.isfinite(res.final.loss)


@pytest.mark.usefixtures("one_thread")
def test_sherry_resume_continues_the_arenas_schedule_exactly(tmp_path, dataset, monkeypatch):
    from hgf.train.checkpoint import Checkpointer

    over = ("--train.ckpt_every=4", "--train.steps=8", "--sherry.arenas_warmup_frac=0.5")
    full = train(tiny_config(tmp_path / "a", dataset, "sherry", *over))
    save = Checkpointer.save

    def save_then_interrupt(self, step, *args):
        path = save(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "b", dataset, "sherry", *over))
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = train(tiny_config(tmp_path / "b", dataset, "sherry", *over))
    assert resumed.resumed_from == 4
    assert resumed.losses == {k: full.losses[k] for k in (5, 6, 7, 8)}
    assert resumed.final.loss == full.final.loss


# ---------------------------------------------------------------------------------- export


@pytest.mark.parametrize("arm,packing", [("tequila", "i2"), ("tequila", "tq1"),
                                         ("sherry", "sherry")])
def test_export_and_generate_through_the_packed_file(arm, packing, tmp_path):
    model, cfg, loss = train_tiny(arm)
    assert loss < 0.5  # the corpus is memorised: greedy decoding has clear margins
    tok = make_tokenizer()
    export_model(model, cfg, tmp_path / "m.hgf", packing)
    header = read_header(tmp_path / "m.hgf")
    by_role = header.bytes_by_role()
    rep = memory_report(build_model(cfg, device="meta"))
    assert by_role["ternary"] + by_role["scale"] == rep.backbone_bytes(packing)
    if arm == "tequila":  # the folded bias, one float32 per output row
        assert by_role["bias"] == rep.bias_bytes > 0
        q = model.layers[0].attn.q_proj
        torch.testing.assert_close(load_packed(tmp_path / "m.hgf")[0].layers[0].attn.q_proj.bias,
                                   q.dead_bias())
    packed, _ = load_packed(tmp_path / "m.hgf")
    for prompt in ("Once upon a time", "Tom and"):
        a = generate(model, tok, prompt, max_new_tokens=16)
        b = generate(packed, tok, prompt, max_new_tokens=16)
        assert a.ids == b.ids and len(a.ids) > 3


def test_cli_export_defaults_to_the_sherry_packing_and_generate_loads_it(tmp_path, capsys):
    model, cfg, _ = train_tiny("sherry")
    run = make_run(tmp_path / "run", model, cfg, make_tokenizer())
    assert main(["export", str(run), "-o", str(tmp_path / "m.hgf")]) == 0
    assert read_header(tmp_path / "m.hgf").packing == "sherry"
    capsys.readouterr()
    outs = []
    for path in (run, tmp_path / "m.hgf"):
        assert main(["generate", str(path), "--prompt", "Tom and", "--temperature", "0",
                     "--max-new-tokens", "12", "--device", "cpu", "--threads", "1"]) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
    assert outs[0] == outs[1]
    assert "native decoder not used" not in cap.err  # the packed file runs natively


def test_sherry_packing_of_a_bitnet_model_is_a_one_line_error(tmp_path):
    model, cfg, _ = train_tiny("bitnet", 1)
    with pytest.raises(HGFError, match="exactly one zero"):
        export_model(model, cfg, tmp_path / "m.hgf", "sherry")


@pytest.mark.gpu
@pytest.mark.parametrize("arm,packing", [("tequila", "i2"), ("sherry", "sherry")])
def test_train_under_bf16_autocast_and_run_packed_on_cuda(arm, packing, tmp_path):
    cfg = load_config(ROOT / "configs" / f"{arm}.toml", ["--model.vocab_size=320"])
    model = build_model(cfg).cuda()
    set_arenas(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 320, (4, 33), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    export_model(model.cpu().eval(), cfg, tmp_path / "m.hgf", packing)
    packed, _ = load_packed(tmp_path / "m.hgf", "cuda")
    with torch.no_grad():
        a = model(x[:, :-1].cpu())
        b = packed(x[:, :-1]).float().cpu()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
