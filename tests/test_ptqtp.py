"""PTQTP: the trit-plane fit (monotone, better than one absmean plane, least-squares scales), the
``hgf convert --to ptqtp`` run (= a hand-built dense α₁T₁ + α₂T₂ model), and its packed file
(= the run's model, through the i2/tq1 kernels)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hgf.config import load_config
from hgf.errors import HGFError
from hgf.hf.convert import convert
from hgf.infer import export_model, generate, load_packed
from hgf.infer.engine import load_for_decode
from hgf.infer.ptqtp import PackedPTQTPLinear
from hgf.model import Transformer, build_model
from hgf.model.ptqtp import PTQTPLinear, best_pairs, fit_trit_planes, solve_alpha
from hgf.runs import load_trained
from infer_utils import ROOT, make_run, make_tokenizer, train_tiny

LAYER_RTOL = 1e-5  # packed vs training layer, × max |y| (float order of operations only)
# packed file vs run: embeddings/head in FP16 and the odd int8 code flip (as tests/test_generate.py)
GOLDEN_MAX_TOL, GOLDEN_MEAN_TOL = 0.03, 0.003


def _weight(out_f: int = 96, in_f: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :3] *= 8  # a few outlier columns, as trained projections have
    return w


def _sq(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w.double() - w_hat.double()).square().sum())


def test_fit_error_decreases_monotonically_and_beats_absmean() -> None:
    w = _weight()
    fit = fit_trit_planes(w, iterations=30, tol=0.0)
    e = fit.errors
    assert fit.rounds >= 3 and e[-1] < e[0]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(e, e[1:], strict=False)), e
    assert _sq(w, fit.dense()) == pytest.approx(e[-1], rel=1e-6)
    # single-plane absmean ternarization (BitNet b1.58, per tensor), written out here
    s = w.abs().mean()
    absmean = (w / s).round().clamp(-1, 1) * s
    assert e[-1] < 0.25 * _sq(w, absmean)
    # planes are ternary, α one pair per row
    assert fit.planes.dtype == torch.int8 and set(fit.planes.unique().tolist()) <= {-1, 0, 1}
    assert fit.alpha.shape == (2, 96)
    # the tolerance stops early; 0 rounds is the init alone
    assert fit_trit_planes(w, iterations=30, tol=1e-2).rounds < fit.rounds
    assert fit_trit_planes(w, iterations=0).rounds == 0


def _ls_alpha(w: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Per row: α = G⁻¹ r, G = [[t1·t1, t1·t2], [t1·t2, t2·t2]], r = [w·t1, w·t2]."""
    out = []
    for wr, a, b in zip(w, t1, t2, strict=True):
        g = np.array([[a @ a, a @ b], [a @ b, b @ b]], dtype=np.float64)
        r = np.array([wr @ a, wr @ b], dtype=np.float64)
        out.append(np.linalg.solve(g, r))
    return np.array(out).T  # [2, out]


def test_alpha_is_the_least_squares_optimum_given_the_planes() -> None:
    w = _weight(40, 64, seed=1)
    g = torch.Generator().manual_seed(2)
    t1 = torch.randint(-1, 2, w.shape, generator=g).float()
    t2 = torch.randint(-1, 2, w.shape, generator=g).float()
    alpha = solve_alpha(w, t1, t2)
    want = _ls_alpha(w.double().numpy(), t1.double().numpy(), t2.double().numpy())
    np.testing.assert_allclose(alpha.double().numpy(), want, rtol=1e-5, atol=1e-9)
    # and the fit's own α are the optimum for the fit's planes
    fit = fit_trit_planes(w, iterations=10)
    p = fit.planes.double().numpy()
    np.testing.assert_allclose(fit.alpha.double().numpy(), _ls_alpha(w.double().numpy(), p[0], p[1]),
                               rtol=1e-5, atol=1e-9)
    # degenerate rows (T₂ = -T₁; T₂ = 0): still a least-squares optimum (numpy's lstsq residual)
    t2[0], t2[1] = -t1[0], 0
    alpha = solve_alpha(w, t1, t2)
    for row in (0, 1):
        a = np.stack([t1[row].double().numpy(), t2[row].double().numpy()], 1)  # [in, 2]
        best = np.linalg.lstsq(a, w[row].double().numpy(), rcond=None)[0]
        fitted = a @ alpha[:, row].double().numpy()
        opt = a @ best
        assert np.sum((w[row].numpy() - fitted) ** 2) == pytest.approx(
            np.sum((w[row].numpy() - opt) ** 2), rel=1e-6)


def test_t_step_picks_the_best_pair_per_element() -> None:
    w = _weight(8, 16, seed=3)
    alpha = torch.tensor([[0.03] * 8, [-0.011] * 8])
    t1, t2 = best_pairs(w, alpha)
    pairs = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    for i in range(8):
        for j in range(16):
            errs = [(w[i, j].item() - 0.03 * a + 0.011 * b) ** 2 for a, b in pairs]
            got = (w[i, j].item() - 0.03 * t1[i, j].item() + 0.011 * t2[i, j].item()) ** 2
            assert got == pytest.approx(min(errs), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The converted run


def _int8_input(mod: nn.Module, args: tuple) -> tuple:
    """Per-token absmax int8 of a projection's input, written out: x_int / s_x."""
    (x,) = args
    s = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((x * s).round().clamp(-128, 127) / s,)


def _hand_built(dense: Transformer, ptqtp: Transformer, int8: bool) -> Transformer:
    """The dense model with every projection weight replaced by α₁T₁ + α₂T₂ (and, for int8
    activations, its input quantized by a pre-hook)."""
    model = copy.deepcopy(dense)
    for name, mod in ptqtp.named_modules():
        if isinstance(mod, PTQTPLinear):
            lin = model.get_submodule(name)
            t = mod.planes.float()
            with torch.no_grad():
                lin.weight.copy_(mod.alpha[0][:, None] * t[0] + mod.alpha[1][:, None] * t[1])
            if int8:
                lin.register_forward_pre_hook(_int8_input)
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    model, cfg, _ = train_tiny("fp16", steps=60)
    return make_run(tmp_path_factory.mktemp("src") / "fp", model, cfg, make_tokenizer())


@pytest.mark.parametrize("activations", ["int8", "fp"])
def test_converted_run_equals_hand_built_dense_model(source: Path, tmp_path: Path,
                                                     activations: str) -> None:
    out = tmp_path / "pt"
    info = convert(source, "ptqtp", out, overrides=["--ptqtp.iterations=8",
                                                    f"--ptqtp.activations={activations}"])
    assert info["ptqtp"]["projections"] == 2 * 7 and info["ptqtp"]["max_rounds"] <= 8
    assert info["ptqtp"]["mean_rel_error"] < info["ptqtp"]["mean_rel_error_absmean"]
    model, cfg = load_trained(out)
    assert cfg.model.linear == "ptqtp" and cfg.model.subln == "off"
    assert cfg.ptqtp.iterations == 8 and cfg.ptqtp.activations == activations
    assert sum(isinstance(m, PTQTPLinear) for m in model.modules()) == 14
    assert list(model.parameters()) and not any(  # projections hold no parameters
        n.endswith(("planes", "alpha")) for n, _ in model.named_parameters())
    fit = json.loads((out / "ptqtp_fit.json").read_text())
    assert set(fit["layers"]) == {n for n, m in model.named_modules() if isinstance(m, PTQTPLinear)}
    assert (out / "tokenizer.json").is_file()
    dense = load_trained(source)[0]
    ref = _hand_built(dense, model, activations == "int8")
    x = torch.randint(0, cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_convert_errors_are_one_line(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    out.mkdir()
    (out / "x").write_text("mine")
    with pytest.raises(HGFError, match="already exists"):
        convert(source, "ptqtp", out)
    assert (out / "x").read_text() == "mine"
    with pytest.raises(HGFError, match="only --ptqtp"):
        convert(source, "ptqtp", tmp_path / "a", overrides=["--train.lr=1"])
    with pytest.raises(HGFError, match="ptqtp.iterations"):
        convert(source, "ptqtp", tmp_path / "b", overrides=["--ptqtp.iterations=-1"])
    bit_cfg = load_config(ROOT / "configs" / "bitnet.toml", ["--model.vocab_size=320"])
    bit = make_run(tmp_path / "bit", build_model(bit_cfg), bit_cfg)
    with pytest.raises(HGFError, match="full-precision"):
        convert(bit, "ptqtp", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# Packed


@pytest.mark.parametrize("packing", ["i2", "tq1"])
def test_packed_layer_equals_training_layer(packing: str) -> None:
    in_f, out_f = 150, 42  # not multiples of 4, 5 or 64: row padding
    layer = PTQTPLinear(in_f, out_f).load_fit(fit_trit_planes(_weight(out_f, in_f), 10))
    packed = PackedPTQTPLinear.from_training(layer, packing)
    assert list(packed.parameters()) == []
    x = torch.randn(3, 7, in_f) * 2
    with torch.no_grad():
        want, got = layer(x), packed(x)
    assert got.shape == want.shape == (3, 7, out_f)
    assert (got - want).abs().max() <= LAYER_RTOL * want.abs().max()


@pytest.mark.parametrize("packing", ["i2", "tq1"])
def test_export_load_reproduces_the_ptqtp_model(source: Path, tmp_path: Path, capsys,
                                                packing: str) -> None:
    from hgf.infer.engine import NativeModel

    convert(source, "ptqtp", tmp_path / "pt", overrides=["--ptqtp.iterations=8"])
    model, cfg = load_trained(tmp_path / "pt")
    export_model(model, cfg, tmp_path / "m.hgf", packing=packing)
    packed, header = load_packed(tmp_path / "m.hgf")
    assert header.config == cfg and type(packed) is Transformer
    assert sum(isinstance(m, PackedPTQTPLinear) for m in packed.modules()) == 14
    per = {"i2": 4, "tq1": 5}[packing]
    assert header.bytes_by_role()["ternary"] == sum(
        2 * m.out_features * -(-m.in_features // per) for m in model.modules()
        if isinstance(m, PTQTPLinear))  # both planes: i2 × 2 = 4 bits per weight
    x = torch.randint(0, cfg.model.vocab_size, (2, 30))
    with torch.no_grad():
        want, got = model(x), packed(x)
    gap = (got - want).abs() / want.abs().max()
    assert gap.max() <= GOLDEN_MAX_TOL and gap.mean() <= GOLDEN_MEAN_TOL
    # hgf generate's loader runs the native decoder (both planes in one GEMV job, then
    # α₁z₁ + α₂z₂): the same logits as the reference path within the golden tolerance, the same
    # greedy tokens, from the file and from the packed model alike
    dec, _ = load_for_decode(tmp_path / "m.hgf")
    assert isinstance(dec, NativeModel) and capsys.readouterr().err == ""
    for nat in (dec, NativeModel.from_model(packed)):
        with torch.no_grad():
            ref = packed(x[:1])[0]
        gap = (nat(x[:1])[0] - ref).abs() / ref.abs().max()
        assert gap.max() <= GOLDEN_MAX_TOL and gap.mean() <= GOLDEN_MEAN_TOL
    tok = make_tokenizer()
    a, b = generate(model, tok, "Once upon a time", 12), generate(dec, tok, "Once upon a time", 12)
    assert a.ids == b.ids


def test_weight_only_model_has_no_packed_form(source: Path, tmp_path: Path) -> None:
    convert(source, "ptqtp", tmp_path / "pt", overrides=["--ptqtp.iterations=2",
                                                         "--ptqtp.activations=fp"])
    model, cfg = load_trained(tmp_path / "pt")
    with pytest.raises(HGFError, match="int8 activations"):
        export_model(model, cfg, tmp_path / "m.hgf")
    assert not (tmp_path / "m.hgf").exists()


def test_llama_folder_converts_like_its_dense_run(tmp_path: Path) -> None:
    """A Llama-family folder (GQA, tied head) as SRC: the same model as its dense run's PTQTP."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    info = convert(tmp_path / "llama", "ptqtp", tmp_path / "pt", overrides=["--ptqtp.iterations=4"])
    assert info["from"] == "llama" and info["ptqtp"]["projections"] == 14
    model, pcfg = load_trained(tmp_path / "pt")
    assert (pcfg.model.linear, pcfg.model.n_kv_heads, pcfg.model.tie_embeddings) == ("ptqtp", 2, True)
    assert model.lm_head.weight is model.tok_emb.weight
    convert(tmp_path / "llama", "run", tmp_path / "dense")
    ref = _hand_built(load_trained(tmp_path / "dense")[0], model, int8=True)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_training_a_ptqtp_config_is_refused(tmp_path: Path) -> None:
    from hgf.train import train

    cfg = load_config(None, ["--model.linear=ptqtp", f"--train.out_dir={tmp_path / 'r'}"])
    with pytest.raises(HGFError, match="no trainable projections"):
        train(cfg)
    assert not (tmp_path / "r").exists()
