"""Export to transformers ``bitnet`` checkpoints: round trip through the import, transformers' own
BitNetForCausalLM loading the exported tensors, HGF models with and without --drop-correction, the
refusals, and the ``hgf convert --to bitnet`` command."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from hgf.cli import main
from hgf.config import load_config
from hgf.errors import HGFError
from hgf.hf.bitnet_export import bitnet_state_dict
from hgf.hf.bitnet_import import import_bitnet, unpack_ternary_along_out
from hgf.hf.convert import write_bitnet
from hgf.model import BitLinear, build_model, ternarize
from hgf.model.hgf_linear import HGFLinear, hgf_layers
from test_bitnet_import import _cfg, _randomize_norms


def _assert_same_logits(a, b):
    """tests/test_bitnet_import.py's tolerance, per sequence: without an int8 flip (an ulp-level
    difference moving an activation across a rounding boundary) a sequence agrees to float32
    rounding (1e-5) everywhere; a flip moves its position and, through attention, the later ones
    by < 2e-2 (which can swap a near tie for the top token). Flips are rare (~1 in 20 sequences
    here), so most sequences are exact."""
    diff = (a - b).abs().amax(-1)  # [b, t]
    assert float(diff.max()) < 2e-2
    assert float((diff <= 1e-5).all(-1).float().mean()) >= 0.5
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9


def _export(model, cfg, out, drop_correction=False):
    return write_bitnet(model, cfg, out, None, drop_correction)


def _same_ternary(a, b):
    """Every projection of ``b`` has the ternary values and scale of ``a``'s."""
    n = 0
    for (name, x), y in zip(a.named_modules(), b.modules(), strict=True):
        if isinstance(x, BitLinear):
            (tx, sx), (ty, sy) = ternarize(x.weight), ternarize(y.weight)
            assert torch.equal(tx, ty), name
            assert float(sy) == pytest.approx(float(sx), rel=1e-6), name
            n += 1
    assert n == 7 * len(a.layers)


@pytest.mark.parametrize("extra", [[], ["--model.mlp=swiglu", "--model.tie_embeddings=true"]])
def test_export_import_round_trip(tmp_path, extra):
    cfg = _cfg(*extra)
    ref = build_model(cfg).eval()
    _randomize_norms(ref)
    assert _export(ref, cfg, tmp_path / "out") == {}
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    m = cfg.model
    assert (hf["model_type"], hf["architectures"]) == ("bitnet", ["BitNetForCausalLM"])
    assert hf["quantization_config"] == {"quant_method": "bitnet", "linear_class": "bitlinear",
                                         "quantization_mode": "offline"}
    assert (hf["hidden_act"], hf["tie_word_embeddings"]) == ({"relu2": "relu2", "swiglu": "silu"}[m.mlp],
                                                             m.tie_embeddings)
    assert hf["num_key_value_heads"] == hf["num_attention_heads"] == m.n_heads
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": m.rope_theta}
    sd = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in sd) == (not m.tie_embeddings)
    q, s = sd["model.layers.1.mlp.up_proj.weight"], sd["model.layers.1.mlp.up_proj.weight_scale"]
    assert (q.dtype, tuple(q.shape), s.dtype, tuple(s.shape)) == (torch.uint8, (m.d_ff // 4, m.d_model),
                                                                  torch.float32, (1,))
    w_t, s_w = ternarize(ref.layers[1].mlp.up_proj.weight)
    assert torch.equal(unpack_ternary_along_out(q, m.d_ff), w_t) and torch.equal(s, s_w.reshape(1))

    got, got_cfg, info = import_bitnet(tmp_path / "out")
    assert info["scale_convention"] == "inverse"
    assert (got_cfg.model.mlp, got_cfg.model.tie_embeddings) == (m.mlp, m.tie_embeddings)
    _same_ternary(ref, got)
    idx = torch.randint(0, m.vocab_size, (4, 24))
    with torch.no_grad():
        _assert_same_logits(got(idx), ref(idx))
    again = bitnet_state_dict(got)  # export(import(export)) packs the same ternary values
    assert again.keys() == sd.keys()
    assert all(torch.equal(again[k], sd[k]) for k in sd if sd[k].dtype == torch.uint8)


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_bitnet_loads_the_export(tmp_path, tie):
    """The strongest check: transformers' own BitNetForCausalLM with packed BitLinear layers, built
    from the exported config.json and given the exported tensors, gives the hgf model's logits."""
    tf = pytest.importorskip("transformers")
    from transformers.integrations.bitnet import BitLinear as TFBitLinear
    from transformers.integrations.bitnet import replace_with_bitnet_linear

    cfg = _cfg(f"--model.tie_embeddings={str(tie).lower()}")
    ref = build_model(cfg).eval()
    _randomize_norms(ref)
    _export(ref, cfg, tmp_path)
    hc = tf.BitNetConfig.from_pretrained(tmp_path)
    model = tf.BitNetForCausalLM(hc).eval()
    qc = {k: v for k, v in hc.quantization_config.items() if k != "quant_method"}
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"],
                               quantization_config=tf.BitNetQuantConfig(**qc))
    missing, unexpected = model.load_state_dict(load_file(tmp_path / "model.safetensors"),
                                                strict=False, assign=True)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    if tie:
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(isinstance(mod, TFBitLinear) for mod in model.modules()) == 7 * cfg.model.n_layers
    idx = torch.randint(0, cfg.model.vocab_size, (4, 20))
    with torch._dynamo.config.patch(disable=True), torch.no_grad():  # BitLinear is torch.compile'd
        theirs = model(idx).logits
        _assert_same_logits(ref(idx), theirs)


@pytest.mark.parametrize("fusion,targets", [("additive", "all"), ("convex", "attention")])
def test_hgf_model_needs_drop_correction(tmp_path, fusion, targets):
    cfg = load_config("configs/hgf_std.toml", ["--model.vocab_size=128", "--model.mlp=relu2",
                                               "--model.max_seq_len=64", "--train.seq_len=32",
                                               f"--hgf.fusion={fusion}", f"--hgf.targets={targets}"])
    ref = build_model(cfg).eval()
    with torch.no_grad():
        for _, layer in hgf_layers(ref):
            layer.B.normal_(0, 0.05)  # a trained-looking correction that moves the logits
            layer.gate.fill_(0.3)
    with pytest.raises(HGFError, match="no low-rank correction path; pass --drop-correction"):
        _export(ref, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    before = copy.deepcopy(ref.state_dict())
    drift = _export(ref, cfg, tmp_path / "out", drop_correction=True)["drift"]
    after = ref.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # B restored after the measurement
    backbone = copy.deepcopy(ref)
    with torch.no_grad():
        for _, layer in hgf_layers(backbone):
            layer.B.zero_()
    idx = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = float((ref(idx) - backbone(idx)).abs().max())
    assert drift["max_abs_logit_diff"] == pytest.approx(moved, rel=1e-5) and moved > 1e-3
    assert drift["mean_kl"] > 0 and 0 <= drift["top1_agreement"] <= 1 and drift["n_tokens"] == 256

    got, got_cfg, _ = import_bitnet(tmp_path / "out")
    assert got_cfg.model.linear == "bitlinear"
    if fusion == "additive":
        _same_ternary(backbone, got)  # the exported backbone is the HGF model's BitLinear part
    else:  # convex: (1 - g)·T(x), the factor folded into weight_scale
        scale = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight_scale"]
        q = ref.layers[0].attn.q_proj
        assert isinstance(q, HGFLinear)
        with torch.no_grad():
            want = ternarize(q.weight)[1] / (1 - q.gate_value())
        assert float(scale) == pytest.approx(float(want), rel=1e-6)
    with torch.no_grad():
        _assert_same_logits(got(idx[:, :24]), backbone(idx[:, :24]))


@pytest.mark.parametrize("preset,extra,msg", [
    ("fp16", [], "dense \\(fp16\\) model has no ternary weights"),
    ("bitnet_diff", [], "differential attention cannot be represented"),
    ("bitnet", ["--model.subln=off"], "always applies attn_sub_norm and ffn_sub_norm"),
    ("bitnet", ["--quant.act_bits=4"], "quantizes activations with 8 bits"),
    ("bitnet", ["--model.d_ff=90"], "model.d_ff=90: .* multiples of 4"),
])
def test_refusals(tmp_path, preset, extra, msg):
    cfg = load_config(f"configs/{preset}.toml", ["--model.vocab_size=64", "--model.max_seq_len=32",
                                                 "--train.seq_len=16", *extra])
    with pytest.raises(HGFError, match=msg) as e:
        _export(build_model(cfg).eval(), cfg, tmp_path / "out", drop_correction=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_convert_to_bitnet(tmp_path, capsys):
    pytest.importorskip("transformers")  # the tokenizer files
    from test_hf import _run_dir

    run, out = tmp_path / "run", tmp_path / "out"
    model = _run_dir(run, "bitnet")
    assert main(["convert", str(run), "--to", "bitnet", str(out)]) == 0
    assert f"(run) -> {out} (bitnet)" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json"}
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0  # <|endoftext|>
    got, _, _ = import_bitnet(out)
    idx = torch.randint(0, 320, (4, 16))
    with torch.no_grad():
        _assert_same_logits(got(idx), model(idx))

    assert main(["convert", str(run), "--to", "bitnet", str(out)]) == 2  # non-empty output
    assert "output already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "h"), "--drop-correction"]) == 2
    assert "--drop-correction applies only to --to bitnet" in capsys.readouterr().err

    hrun = tmp_path / "hrun"
    _run_dir(hrun, "hgf_std")
    assert main(["convert", str(hrun), "--to", "bitnet", str(tmp_path / "h1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --drop-correction" in err
    assert not (tmp_path / "h1").exists()
    assert main(["convert", str(hrun), "--to", "bitnet", str(tmp_path / "h2"), "--drop-correction"]) == 0
    text = capsys.readouterr().out
    assert "correction dropped (B := 0): on 256 random tokens max |dlogit| 0," in text  # B = 0 at init
    assert "top-1 agreement 1.000" in text
