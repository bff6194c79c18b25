"""Llama-architecture folders <-> dense hgf models (hgf.hf.llama_import): a small random
``LlamaForCausalLM`` built here with transformers, converted, gives the same logits in hgf (the RoPE
layout, grouped-query attention, tied and untied heads, sharded files); the export loads back into
transformers with the same logits; unsupported features fail with one line naming them."""

import json

import pytest
import torch

from hgf.cli import main
from hgf.config import load_config
from hgf.errors import HGFError
from hgf.hf.convert import convert, detect_format
from hgf.hf.llama_import import adapt_tokenizer, config_from_llama, import_llama
from hgf.model import build_model
from hgf.runs import load_trained

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ATOL = 1e-5


def _llama(n_kv=2, tie=False, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tie, **kw)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so attention and RoPE matter in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return model


def _ids(n=2, t=40, vocab=96):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n_kv,tie", [(4, False), (2, False), (1, True)])
def test_llama_logits_match_transformers(tmp_path, n_kv, tie):
    ref = _llama(n_kv, tie)
    ref.save_pretrained(tmp_path / "llama")
    assert detect_format(tmp_path / "llama") == "llama"
    info = convert(tmp_path / "llama", "run", tmp_path / "run")
    assert info["from"] == "llama" and info["kv_heads"] == n_kv
    model, cfg = load_trained(tmp_path / "run")
    m = cfg.model
    assert (m.linear, m.attention, m.mlp, m.subln) == ("dense", "standard", "swiglu", "off")
    assert (m.n_heads, m.n_kv_heads or m.n_heads, m.tie_embeddings) == (4, n_kv, tie)
    assert (m.rope_theta, m.norm_eps, m.max_seq_len) == (50000.0, 1e-5, 64)
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids)
    assert want.abs().max() > 1  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_gqa_kv_cache_decode_equals_full_forward(tmp_path):
    _llama(n_kv=2).save_pretrained(tmp_path / "llama")
    model, _, _ = import_llama(tmp_path / "llama")
    ids = _ids(1, 12)
    with torch.no_grad():
        full = model(ids)
        model.setup_caches(1, 12)
        steps = [model(ids[:, :5])] + [model(ids[:, i:i + 1], start=i) for i in range(5, 12)]
        model.clear_caches()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_sharded_checkpoint(tmp_path):
    ref = _llama()
    ref.save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    model, _, _ = import_llama(tmp_path / "llama")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("n_kv_heads,tie", [(0, False), (2, True)])
def test_export_loads_in_transformers_and_round_trips(tmp_path, n_kv_heads, tie):
    cfg = load_config("configs/fp16.toml", ["--model.vocab_size=96", "--model.d_model=32",
                                            f"--model.n_kv_heads={n_kv_heads}",
                                            f"--model.tie_embeddings={tie}",
                                            "--model.max_seq_len=64", "--train.seq_len=32"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    from hgf.runs import save_config, save_weights

    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run")
    save_weights(model, tmp_path / "run" / "model.safetensors")
    assert main(["convert", str(tmp_path / "run"), "--to", "llama", str(tmp_path / "llama")]) == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=ATOL)
    assert main(["convert", str(tmp_path / "llama"), "--to", "run", str(tmp_path / "back")]) == 0
    back, _ = load_trained(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), want, rtol=0, atol=0)


def test_export_refuses_ternary_models(tmp_path):
    from hgf.hf.llama_import import check_llama_exportable

    with pytest.raises(HGFError, match="model.linear=bitlinear"):
        check_llama_exportable(load_config("configs/bitnet.toml"))
    with pytest.raises(HGFError, match="model.attention=differential"):
        check_llama_exportable(load_config("configs/diff_only.toml"))


BASE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=96,
            hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("change,message", [
    (dict(attention_bias=True), "attention_bias=true not supported"),
    (dict(mlp_bias=True), "mlp_bias=true not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_type='llama3' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type='linear' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type='yarn'"),
    (dict(head_dim=16), "head_dim=16"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized checkpoint"),
])
def test_unsupported_features_fail_with_one_line(change, message):
    with pytest.raises(HGFError, match=message) as e:
        config_from_llama({**BASE, **change}, "x/config.json")
    assert "\n" not in str(e.value)


def test_other_architectures_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(HGFError, match=r"model_type 'qwen2' \(Qwen2ForCausalLM\) is not supported"):
        detect_format(tmp_path)
    assert main(["convert", str(tmp_path), "--to", "run", str(tmp_path / "out")]) != 0


def test_pickle_weights_are_refused(tmp_path):
    _llama().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HGFError, match="safetensors"):
        import_llama(tmp_path)


def _tokenizer_json(specials: list[str]) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({c: len(vocab) + i for i, c in enumerate("abcdefgh ")})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(specials)
    return json.loads(tok.to_str())


def test_tokenizer_eos_becomes_endoftext(tmp_path):
    from hgf.data.tokenizer import TokenizerSpec, id_range, load_tokenizer

    tok, renamed = adapt_tokenizer(_tokenizer_json(["<unk>", "<s>", "</s>"]), eos_id=2)
    assert renamed == "</s>"
    assert {a["content"]: a["id"] for a in tok["added_tokens"]}["<|endoftext|>"] == 2
    (tmp_path / "t.json").write_text(json.dumps(tok))
    loaded = load_tokenizer(TokenizerSpec("json", (tmp_path / "t.json",)), "t")
    assert loaded.token_to_id("<|endoftext|>") == 2 and id_range(loaded) == 12  # no id added
    same, none = adapt_tokenizer(_tokenizer_json(["<unk>", "<|endoftext|>"]), eos_id=1)
    assert none is None and same == _tokenizer_json(["<unk>", "<|endoftext|>"])

    ref = _llama()  # through hgf convert: the run's tokenizer.json is the adapted one
    ref.config.eos_token_id = 2
    ref.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text(json.dumps(_tokenizer_json(
        ["<unk>", "<s>", "</s>"])))
    convert(tmp_path / "llama", "run", tmp_path / "run")
    out = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert any(a["content"] == "<|endoftext|>" and a["id"] == 2 for a in out["added_tokens"])
