"""Import of transformers ``bitnet`` packed checkpoints: the packer against the ANCHORS layout and
transformers' own pack/unpack, the latent-weight construction, and logits of imported models
against (a) the hgf model the checkpoint was written from, in both scale conventions, and (b)
transformers' own BitNet model with BitLinear / AutoBitLinear layers."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hgf.cli import main
from hgf.config import load_config
from hgf.errors import HGFError
from hgf.hf.bitnet_import import (
    detect_scale_convention,
    import_bitnet,
    latent_weight,
    pack_ternary_along_out,
    unpack_ternary_along_out,
)
from hgf.model import BitLinear, build_model, ternarize
from hgf.runs import load_trained

ROLES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _ternary(out, inp, zero_frac=0.3):
    w = torch.randint(0, 2, (out, inp)).float() * 2 - 1
    w[torch.rand(out, inp) < zero_frac] = 0
    return w


def test_pack_layout_by_hand():
    # out = 5 -> R = 2: packed row 0 holds rows 0, 2, 4 (bit pairs 0-1, 2-3, 4-5), row 1 holds 1, 3
    w = torch.tensor([[-1.0], [0.0], [1.0], [-1.0], [0.0]])
    p = pack_ternary_along_out(w)
    assert p.dtype == torch.uint8 and p.shape == (2, 1)
    assert p[0, 0] == (0 | 2 << 2 | 1 << 4) and p[1, 0] == (1 | 0 << 2)  # value + 1, padding 0
    assert torch.equal(unpack_ternary_along_out(p, 5), w)


@pytest.mark.parametrize("out", [1, 4, 5, 6, 7, 8, 13])
def test_pack_round_trip_and_matches_transformers(out):
    w = _ternary(out, 9)
    p = pack_ternary_along_out(w)
    assert p.shape == ((out + 3) // 4, 9)
    assert torch.equal(unpack_ternary_along_out(p, out), w)
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    assert torch.equal(bitnet.pack_weights(w.clone()), p)
    with torch._dynamo.config.patch(disable=True):  # unpack_weights is torch.compile'd
        assert torch.equal(bitnet.unpack_weights(p, torch.float32)[:out], w)


def test_invalid_code_is_refused():
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary_along_out(torch.full((1, 2), 0b11, dtype=torch.uint8), 4)


@pytest.mark.parametrize("zero_frac", [0.0, 0.3, 0.7])
def test_latent_weight_gives_back_ternary_values_and_scale(zero_frac):
    w_t, m = _ternary(64, 48, zero_frac), 0.0173
    z = float((w_t == 0).float().mean())
    naive_t, naive_s = ternarize(w_t * m)  # W_t·m: right values, scale off by (1 - z)
    assert torch.equal(naive_t, w_t)
    assert float(1 / naive_s) == pytest.approx(m * (1 - z), rel=1e-6)
    got_t, s = ternarize(latent_weight(w_t, m))  # W_t·m/(1-z): both exact (scale to a few ulps)
    assert torch.equal(got_t, w_t)
    assert float(1 / s) == pytest.approx(m, rel=1e-6)
    assert torch.allclose(got_t / s, w_t * m, rtol=1e-6, atol=0)


def _cfg(*extra):
    return load_config("configs/bitnet.toml", ["--model.vocab_size=128", "--model.mlp=relu2",
                                               "--model.max_seq_len=64", "--train.seq_len=32", *extra])


def _write_checkpoint(model, path, convention, linear_class=None, dtype=torch.float32):
    """Our own writer: LLaMA/BitNet names, packed weights, one scale per tensor."""
    m = model.cfg.model
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = blk.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = blk.mlp_norm.weight
        sd[p + "self_attn.attn_sub_norm.weight"] = blk.attn.subln.weight
        sd[p + "mlp.ffn_sub_norm.weight"] = blk.mlp.subln.weight
        for role, parent in ROLES.items():
            w_t, s = ternarize(getattr(blk.attn if parent == "self_attn" else blk.mlp, role).weight)
            sd[f"{p}{parent}.{role}.weight"] = pack_ternary_along_out(w_t)
            scale = s if convention == "inverse" else 1 / s  # s = 1/mean|W|
            sd[f"{p}{parent}.{role}.weight_scale"] = scale.reshape(1).to(dtype)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, path / "model.safetensors")
    hf = {"model_type": "bitnet", "vocab_size": m.vocab_size, "hidden_size": m.d_model,
          "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers,
          "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads, "hidden_act": "relu2",
          "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}}
    if linear_class:
        hf["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class}
    (path / "config.json").write_text(json.dumps(hf))


def _assert_same_logits(a, b):
    """Equal up to float32 rounding (1e-5), except where an ulp-level difference moved an int8
    activation across a rounding boundary: such a flip touches a few positions, by < 2e-2."""
    diff = (a - b).abs().amax(-1)  # [b, t]
    assert float(diff.max()) < 2e-2
    assert float((diff <= 1e-5).float().mean()) >= 0.9
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def _randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "subln" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.mark.parametrize("convention", ["mean", "inverse"])
@pytest.mark.parametrize("how", ["magnitudes", "linear_class", "explicit"])
def test_import_equals_the_hgf_model_it_was_written_from(tmp_path, convention, how):
    ref = build_model(_cfg()).eval()
    _randomize_norms(ref)
    lc = {"mean": "autobitlinear", "inverse": "bitlinear"}[convention] if how == "linear_class" else None
    _write_checkpoint(ref, tmp_path, convention, lc)
    got, cfg, info = import_bitnet(tmp_path, convention if how == "explicit" else "auto")
    assert info["scale_convention"] == convention
    assert (cfg.model.mlp, cfg.model.subln, cfg.model.linear) == ("relu2", "on", "bitlinear")
    for (name, a), b in zip(ref.named_modules(), got.modules(), strict=True):
        if isinstance(a, BitLinear):
            (ta, sa), (tb, sb) = ternarize(a.weight), ternarize(b.weight)
            assert torch.equal(ta, tb), name
            assert float(sb) == pytest.approx(float(sa), rel=1e-6), name
    idx = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        _assert_same_logits(got(idx), ref(idx))
        wrong, _, _ = import_bitnet(tmp_path, {"mean": "inverse", "inverse": "mean"}[convention])
        assert float((wrong(idx) - ref(idx)).abs().amax(-1).min()) > 2e-2


def test_import_as_hgf_equals_the_bitnet_and_cli(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "run"
    ckpt.mkdir()
    ref = build_model(_cfg()).eval()
    _write_checkpoint(ref, ckpt, "inverse", dtype=torch.bfloat16)  # bf16 scales
    (ckpt / "tokenizer.json").write_text("{}")
    assert main(["convert", str(ckpt), "--from", "bitnet", "--to", "run", str(out),
                 "--model.linear=hgf", "--hgf.rank=4"]) == 0
    assert "scale convention: inverse (all weight_scale values >= 2" in capsys.readouterr().out
    hgf_model, cfg = load_trained(out)
    assert (cfg.model.linear, cfg.hgf.rank) == ("hgf", 4)
    assert (out / "tokenizer.json").read_text() == "{}"
    bitnet, _, _ = import_bitnet(ckpt)
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(hgf_model(idx), bitnet(idx))  # B = 0: the HGF model is the BitNet
    assert main(["convert", str(ckpt), "--to", "run", str(tmp_path / "auto")]) == 0  # format detected
    assert "(bitnet) ->" in capsys.readouterr().out
    assert main(["convert", str(ckpt), "--from", "bitnet", "--to", "run", str(tmp_path / "x"),
                 "--model.d_model=32"]) == 2
    assert "model.d_model is fixed by the BitNet checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_scale_convention_detection():
    assert detect_scale_convention({}, [0.01, 0.3])[0] == "mean"
    assert detect_scale_convention({}, [40.0, 2.5])[0] == "inverse"
    assert detect_scale_convention({"quantization_config": {"linear_class": "bitlinear"}}, [0.9])[0] == "inverse"
    with pytest.raises(HGFError, match="--scale-convention"):
        detect_scale_convention({}, [0.2, 3.0])


def test_bad_checkpoints_are_refused(tmp_path):
    ref = build_model(_cfg()).eval()
    _write_checkpoint(ref, tmp_path, "inverse")
    from safetensors.torch import load_file

    # Copies: safetensors < 0.8 maps the file lazily, and the loop below overwrites it.
    sd = {k: v.clone() for k, v in load_file(tmp_path / "model.safetensors").items()}
    key = "model.layers.0.self_attn.q_proj.weight"
    for change, msg in [(lambda d: d.pop(key + "_scale"), "weight_scale: missing"),
                        (lambda d: d.__setitem__(key, d[key][:-1].contiguous()), "packed shape"),
                        (lambda d: d.__setitem__("model.extra.weight", torch.ones(2)), "no hgf counterpart")]:
        bad = dict(sd)
        change(bad)
        save_file(bad, tmp_path / "model.safetensors")
        with pytest.raises(HGFError, match=msg):
            import_bitnet(tmp_path)


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_import_matches_transformers_bitnet(tmp_path, linear_class):
    """transformers' own BitNet (packed BitLinear or AutoBitLinear, grouped-query attention) as the
    reference: same logits from the hgf import of the checkpoint."""
    tf = pytest.importorskip("transformers")
    from transformers.integrations.bitnet import AutoBitLinear, replace_with_bitnet_linear
    from transformers.integrations.bitnet import BitLinear as TFBitLinear

    hc = tf.BitNetConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = tf.BitNetForCausalLM(hc).eval()
    _randomize_norms(model)
    qc = tf.BitNetQuantConfig(linear_class=linear_class)
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    packed = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (TFBitLinear, AutoBitLinear)):
            w_t, m = _ternary(mod.out_features, mod.in_features), 0.01 + 0.05 * float(torch.rand(()))
            scale = torch.tensor([1 / m if linear_class == "bitlinear" else m])
            mod.weight = pack_ternary_along_out(w_t) if linear_class == "bitlinear" else torch.nn.Parameter(w_t)
            mod.weight_scale = scale
            packed[name + ".weight"], packed[name + ".weight_scale"] = pack_ternary_along_out(w_t), scale
    sd = {k: v.contiguous() for k, v in model.state_dict().items()} | packed
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hc.to_dict() | {"quantization_config": qc.to_dict()}))

    idx = torch.randint(0, 96, (2, 20))
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        ref = model(idx).logits
    ours, _, info = import_bitnet(tmp_path)
    assert info["kv_heads_repeated"] == 2
    with torch.no_grad():
        _assert_same_logits(ours(idx), ref)
