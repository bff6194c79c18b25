"""GGUF export and import without llama.cpp (the ``gguf`` package only): the tensors and keys
llama.cpp's ``bitnet`` loader reads, the LoRA adapter, the tokenizer keys, export -> import round
trips, files shaped like convert_hf_to_gguf.py's, the CLI, and every refusal in one line.
Against the real llama.cpp: tests/test_gguf_llama.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hgf.cli import main
from hgf.config import load_config
from hgf.errors import HGFError
from hgf.gguf.export import export_model_gguf, lora_path_for, model_tensors
from hgf.gguf.import_ import import_gguf
from hgf.gguf.tokenizer import CONTROL, UNUSED, tokenizer_json_from_fields, vocab_from_tokenizer_json
from hgf.model import build_model, ternarize
from hgf.model.hgf_linear import hgf_layers
from infer_utils import make_run, make_tokenizer
from test_bitnet_export import _assert_same_logits

gguf = pytest.importorskip("gguf")

DIMS = ["--model.vocab_size=320", "--model.d_model=256", "--model.d_ff=256", "--model.n_heads=4",
        "--model.tie_embeddings=true", "--model.max_seq_len=64", "--train.seq_len=32"]


def _model(arm: str, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(f"configs/{arm}.toml", [*DIMS, *extra])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "subln" in name:
                p.uniform_(0.5, 1.5)
        for _, layer in hgf_layers(model):
            layer.B.normal_(0, 0.05)
            layer.gate.fill_(0.3)
    return model, cfg


def _tensors(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def test_bitnet_file_holds_what_llama_cpp_reads(tmp_path):
    model, cfg = _model("hgf_std")
    tok = make_tokenizer()
    info = export_model_gguf(model, cfg, tmp_path / "m.gguf", "i2", "fp16", tok.to_str())
    assert info["files"] == [tmp_path / "m.gguf", tmp_path / "m.lora.gguf"]
    r, ts = _tensors(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    m = cfg.model
    assert f["general.architecture"] == "bitnet"
    assert (f["bitnet.embedding_length"], f["bitnet.block_count"], f["bitnet.feed_forward_length"],
            f["bitnet.attention.head_count"], f["bitnet.attention.head_count_kv"],
            f["bitnet.rope.dimension_count"], f["bitnet.context_length"]) == (
        m.d_model, m.n_layers, m.d_ff, m.n_heads, m.n_heads, m.d_model // m.n_heads, m.max_seq_len)
    per_layer = {"attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"} | {
        f"{p}.{s}" for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                             "ffn_down") for s in ("weight", "scale")}
    want = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}" + ("" if n.endswith(("weight", "scale")) else ".weight")
        for i in range(m.n_layers) for n in per_layer}
    assert set(ts) == want  # no output.weight: llama.cpp's bitnet head is token_embd
    q = ts["blk.1.ffn_down.weight"]
    assert q.tensor_type.name == "TQ2_0" and list(q.shape) == [m.d_ff, m.d_model]
    mod = model.layers[1].mlp.down_proj
    w_t, s_w = ternarize(mod.weight)
    deq = gguf.quants.dequantize(q.data, q.tensor_type)
    assert np.array_equal(deq, w_t.numpy())  # W_t itself, block scale d = 1 exactly
    scale = float(ts["blk.1.ffn_down.scale"].data[0])
    assert scale == pytest.approx(float(1 / s_w), rel=1e-7)  # additive fusion: scale = mean|W|

    r, ts = _tensors(tmp_path / "m.lora.gguf")
    fields = {k: v.contents() for k, v in r.fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == (
        "adapter", "lora", "bitnet")
    assert fields["adapter.lora.alpha"] == model.rank  # LoRA scale alpha / r = 1
    assert len(ts) == 2 * 7 * m.n_layers
    a, b = ts["blk.1.ffn_down.weight.lora_a"].data, ts["blk.1.ffn_down.weight.lora_b"].data
    g = float(mod.gate_value().detach())
    assert np.allclose(a, mod.A.detach().numpy()) and np.allclose(b, g * mod.B.detach().numpy())


def test_tq1_and_convex_fusion_fold_into_the_scale(tmp_path):
    model, cfg = _model("hgf_std", "--hgf.fusion=convex")
    tensors = model_tensors(model, cfg, "tq1", "fp32")
    data, qtype = tensors.items["blk.0.attn_q.weight"]
    assert qtype == "TQ1_0" and data.shape == (256, 54)  # 1.69 bits/weight
    q = model.layers[0].attn.q_proj
    w_t, s_w = ternarize(q.weight)
    deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.TQ1_0)
    assert np.array_equal(deq, w_t.numpy())
    want = float((1 - q.gate_value().detach()) / s_w)
    assert float(tensors.items["blk.0.attn_q.scale"][0][0]) == pytest.approx(want, rel=1e-6)
    assert tensors.items["token_embd.weight"][1] == "F32"


def test_fp16_arm_maps_to_llama_with_rope_permutation(tmp_path):
    cfg = load_config("configs/fp16.toml", ["--model.vocab_size=320", "--model.max_seq_len=64",
                                            "--train.seq_len=32"])
    model = build_model(cfg).eval()
    export_model_gguf(model, cfg, tmp_path / "d.gguf", embeddings="fp32")
    r, ts = _tensors(tmp_path / "d.gguf")
    assert r.fields["general.architecture"].contents() == "llama"
    assert "output.weight" in ts and "blk.0.attn_sub_norm.weight" not in ts  # untied, no SubLN
    hd = cfg.model.d_model // cfg.model.n_heads
    q = gguf.quants.dequantize(ts["blk.0.attn_q.weight"].data, ts["blk.0.attn_q.weight"].tensor_type)
    w = model.layers[0].attn.q_proj.weight.detach().numpy()
    # head 0: rows (0, hd/2) of hgf's half-split pairs become llama.cpp's interleaved rows (0, 1)
    assert np.allclose(q[0], w[0], atol=1e-3) and np.allclose(q[1], w[hd // 2], atol=1e-3)
    v = gguf.quants.dequantize(ts["blk.0.attn_v.weight"].data, ts["blk.0.attn_v.weight"].tensor_type)
    assert np.allclose(v, model.layers[0].attn.v_proj.weight.detach().numpy(), atol=1e-3)


def test_tokenizer_keys():
    tok = make_tokenizer()
    vocab = vocab_from_tokenizer_json(tok.to_str(), 320, "tok")
    assert len(vocab.tokens) == 320 and vocab.eos_id == tok.token_to_id("<|endoftext|>") == 0
    assert vocab.types[0] == CONTROL and vocab.types[-1] == UNUSED and vocab.tokens[-1] == "[PAD319]"
    assert vocab.merges[0] == "Ġ a"
    text, _ = tokenizer_json_from_fields("gpt2", "gpt-2", vocab.tokens, vocab.types, vocab.merges)
    from tokenizers import Tokenizer

    back = Tokenizer.from_str(text)
    for s in ["Once upon a time, Tom's dog ran.", "Ça va? 日本語 🙂<|endoftext|>x  y\n\nz"]:
        assert back.encode(s).ids == tok.encode(s).ids
    assert tokenizer_json_from_fields("llama", None, [], [], [])[0] is None


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t.update(normalizer={"type": "NFC"}), "normalizer"),
    (lambda t: t.update(pre_tokenizer={"type": "Whitespace"}), "not GPT-2's byte-level split"),
    (lambda t: t["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda t: t.update(post_processor={"type": "TemplateProcessing"}), "adds tokens"),
])
def test_tokenizer_refusals(edit, msg):
    t = json.loads(make_tokenizer().to_str())
    edit(t)
    with pytest.raises(HGFError, match=msg) as e:
        vocab_from_tokenizer_json(json.dumps(t), 320, "tok")
    assert "\n" not in str(e.value)
    with pytest.raises(HGFError, match="more than the model's model.vocab_size=100"):
        vocab_from_tokenizer_json(make_tokenizer().to_str(), 100, "tok")


@pytest.mark.parametrize("preset,extra,msg", [
    ("bitnet_diff", [], "llama.cpp has no differential attention; exportable arms: bitnet and hgf_std"),
    ("hgf", [], "llama.cpp has no differential attention"),
    ("bitnet", ["--model.mlp=relu2"], "model.mlp=relu2: .*SwiGLU"),
    ("bitnet", ["--model.subln=off"], "always applies attn_sub_norm"),
    ("bitnet", ["--model.tie_embeddings=false"], "model.tie_embeddings=false: .*token_embd as the output head"),
    ("hgf_std", ["--quant.act_bits=4"], "quantize activations to 8 bits"),
    ("bitnet", ["--model.d_ff=384"], "model.d_ff=384: .*multiples of 256"),
    ("fp16", ["--model.subln=on"], "llama architecture has no SubLN"),
    ("tequila", [], "model.linear=tequila: not exportable to GGUF yet"),
    ("sherry", [], "model.linear=sherry: not exportable to GGUF yet"),
    ("fp16", ["--model.linear=ptqtp", "--model.subln=on"], "model.linear=ptqtp: not exportable"),
])
def test_refusals(tmp_path, preset, extra, msg):
    cfg = load_config(f"configs/{preset}.toml", [*DIMS, *extra])
    with pytest.raises(HGFError, match=msg) as e:
        export_model_gguf(build_model(cfg).eval(), cfg, tmp_path / "x.gguf")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("packing", ["i2", "tq1"])
def test_export_import_round_trip(tmp_path, packing):
    model, cfg = _model("bitnet")
    tok = make_tokenizer()
    export_model_gguf(model, cfg, tmp_path / "b.gguf", packing, "fp32", tok.to_str())
    got, got_cfg, info = import_gguf(tmp_path / "b.gguf")
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "linear",
              "attention", "mlp", "tie_embeddings", "rope_theta", "norm_eps"):
        assert getattr(got_cfg.model, k) == getattr(cfg.model, k), k
    assert got_cfg.model.subln == "on"
    for (name, a), b in zip(model.named_parameters(), got.parameters(), strict=True):
        if name.endswith("proj.weight"):
            (ta, sa), (tb, sb) = ternarize(a), ternarize(b)
            assert torch.equal(ta, tb) and float(sb) == pytest.approx(float(sa), rel=1e-6), name
        else:
            assert torch.equal(a, b), name
    idx = torch.randint(0, 320, (4, 40))
    with torch.no_grad():  # float32 rounding, up to rare int8 activation flips (test_bitnet_export)
        _assert_same_logits(got(idx), model(idx))
    from tokenizers import Tokenizer

    back = Tokenizer.from_file(str(info["tokenizer"]))
    s = "Once upon a time there was a little dog.<|endoftext|>Tom"
    assert back.encode(s).ids == tok.encode(s).ids


def test_import_convert_hf_to_gguf_style_file(tmp_path):
    """A TQ2_0 file as llama.cpp's converter writes one: blocks of W_t·m (d = m in f16, no
    .scale tensor), grouped-query K/V, rope scaling linear 1.0, no tokenizer."""
    torch.manual_seed(1)
    m = load_config("configs/bitnet.toml", DIMS).model
    n_kv, hd = 2, m.d_model // m.n_heads
    w = gguf.GGUFWriter(tmp_path / "p.gguf", "bitnet")
    for k, v in (("context_length", 64), ("embedding_length", 256), ("block_count", 2),
                 ("feed_forward_length", 256), ("attention.head_count", 4),
                 ("attention.head_count_kv", n_kv)):
        w.add_uint32(f"bitnet.{k}", v)
    w.add_float32("bitnet.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("bitnet.rope.freq_base", 500000.0)
    w.add_string("bitnet.rope.scaling.type", "linear")
    w.add_float32("bitnet.rope.scaling.factor", 1.0)
    emb = torch.randn(320, 256) * 0.02
    w.add_tensor("token_embd.weight", emb.numpy())
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    shapes = {"attn_q": (256, 256), "attn_k": (n_kv * hd, 256), "attn_v": (n_kv * hd, 256),
              "attn_output": (256, 256), "ffn_gate": (256, 256), "ffn_up": (256, 256),
              "ffn_down": (256, 256)}
    ref = {}
    for i in range(2):
        for n in ("attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", np.ones(256, np.float32))
        for n, shape in shapes.items():
            w_t = torch.randint(-1, 2, shape).float()
            mean = float(np.float16(0.01 + 0.001 * i))  # what a TQ block's f16 d can hold exactly
            ref[(i, n)] = (w_t, mean)
            q = gguf.quants.quantize((w_t * mean).numpy(), gguf.GGMLQuantizationType.TQ2_0)
            w.add_tensor(f"blk.{i}.{n}.weight", q, raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, cfg, info = import_gguf(tmp_path / "p.gguf")
    assert info["kv_heads_repeated"] == 2 and info["tokenizer"] is None
    assert cfg.model.rope_theta == 500000.0 and cfg.model.tie_embeddings
    k = model.layers[1].attn.k_proj.weight
    w_t, s = ternarize(k)
    want, mean = ref[(1, "attn_k")]
    assert torch.equal(w_t, want.view(n_kv, hd, -1).repeat_interleave(2, 0).reshape(256, 256))
    assert float(1 / s) == pytest.approx(mean, rel=1e-6)


def test_import_refusals(tmp_path):
    model, cfg = _model("fp16")
    export_model_gguf(model, cfg, tmp_path / "d.gguf")
    with pytest.raises(HGFError, match="GGUF architecture 'llama' cannot be imported") as e:
        import_gguf(tmp_path / "d.gguf")
    assert "\n" not in str(e.value)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(HGFError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "junk.gguf")
    with pytest.raises(HGFError, match="GGUF file not found"):
        import_gguf(tmp_path / "missing.gguf")
    # two block scales in one tensor: hgf keeps one scale per projection, so this is refused
    b, bcfg = _model("bitnet")
    export_model_gguf(b, bcfg, tmp_path / "b.gguf", embeddings="fp32")
    r = gguf.GGUFReader(tmp_path / "b.gguf", "r+")
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    t.data[0, -2:] = np.frombuffer(np.float16(2.0).tobytes(), np.uint8)  # block 0's d := 2
    del r
    with pytest.raises(HGFError, match="blk.0.ffn_up.weight is not ternary with one scale"):
        import_gguf(tmp_path / "b.gguf")


def test_cli_export_and_convert(tmp_path, capsys):
    model, cfg = _model("hgf_std")
    run = make_run(tmp_path / "run", model, cfg, make_tokenizer())
    out = tmp_path / "o" / "model.gguf"
    assert main(["export", str(run), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama.cpp architecture bitnet, ternary weights TQ2_0; tokenizer included" in text
    assert f"run it: llama-cli -m {out} --lora {lora_path_for(out)}" in text
    assert out.is_file() and lora_path_for(out).is_file()

    assert main(["export", str(run), "-o", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "a.gguf"), "--lora"]) == 0
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["general.type"].contents() == "adapter"
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(tmp_path / "t.bin"), "--format", "gguf",
                 "--drop-correction"]) == 2
    assert "needs the .gguf extension" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(tmp_path / "t.gguf"), "--drop-correction",
                 "--packing", "tq1"]) == 0
    text = capsys.readouterr().out
    assert "correction dropped (B := 0)" in text and not lora_path_for(tmp_path / "t.gguf").exists()
    assert main(["export", str(run), "-o", str(tmp_path / "t.hgf"), "--lora"]) == 2
    assert "apply to GGUF outputs" in capsys.readouterr().err

    assert main(["convert", str(tmp_path / "t.gguf"), "--to", "run", str(tmp_path / "back")]) == 0
    text = capsys.readouterr().out
    assert "(gguf) -> " in text and "byte-level BPE" in text
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert main(["convert", str(out), "--to", "run", str(tmp_path / "h"), "--model.linear=hgf",
                 "--hgf.rank=4"]) == 0
    capsys.readouterr()

    diff, dcfg = _model("bitnet_diff")
    drun = make_run(tmp_path / "drun", diff, dcfg)
    assert main(["export", str(drun), "-o", str(tmp_path / "d.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no differential attention" in err


def test_cli_convert_refuses_other_architectures(tmp_path, capsys):
    model, cfg = _model("fp16")
    export_model_gguf(model, cfg, tmp_path / "d.gguf")
    assert main(["convert", str(tmp_path / "d.gguf"), "--to", "run", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GGUF architecture 'llama' cannot be imported" in err
    assert not (tmp_path / "o").exists()


def test_peer_without_llama_cpp_is_one_line(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert main(["bench", "infer", "--peer", "llama.cpp", "--size", "small", "--gemv-sizes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install llama-cpp-python==0.3.36" in err
