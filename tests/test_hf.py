"""Hugging Face interop: save/load round trip, generate() against a plain greedy loop over the hgf
Transformer, and ``hgf convert`` run -> hf -> run."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from hgf.cli import main  # noqa: E402
from hgf.config import load_config  # noqa: E402
from hgf.errors import HGFError  # noqa: E402
from hgf.hf.modeling import HGFForCausalLM, HGFPreTrainedConfig  # noqa: E402
from hgf.model import build_model, lm_loss  # noqa: E402
from hgf.runs import load_trained, save_config, save_weights  # noqa: E402

SMALL = ["--model.vocab_size=256", "--model.max_seq_len=64", "--train.seq_len=32"]


def _model(arm: str, *extra: str):
    cfg = load_config(f"configs/{arm}.toml", SMALL + list(extra))
    return build_model(cfg).eval(), cfg


def _greedy(model, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: recompute the whole prefix and take the argmax, n times."""
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("arm,tie", [("hgf", False), ("bitnet", True), ("fp16", False)])
def test_save_load_round_trip_gives_identical_logits(tmp_path, arm, tie):
    model, cfg = _model(arm, f"--model.tie_embeddings={tie}")
    hf = HGFForCausalLM.from_transformer(model)
    assert set(hf.state_dict()) == {f"model.{k}" for k in model.state_dict()}  # 1:1 under a prefix
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hgf"
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(back, HGFForCausalLM) and back.config.to_hgf() == cfg
    assert (back.model.lm_head.weight is back.model.tok_emb.weight) == tie
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, model(idx))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("arm", ["hgf", "bitnet"])
def test_generate_greedy_equals_plain_loop(arm, use_cache):
    model, _ = _model(arm)
    hf = HGFForCausalLM.from_transformer(model)
    prompt = torch.randint(0, 256, (2, 7))
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                      pad_token_id=None, eos_token_id=None)
    assert out.shape == (2, 19)
    assert torch.equal(out, _greedy(model, prompt, 12))


def _cache_for_next_step(hf, out) -> list:
    """The cache(s) generate() hands to the next forward, as it takes them from the output."""
    kw = hf._update_model_kwargs_for_generation(out, {})
    return [v for k, v in kw.items() if k in ("cache", "past_key_values")]


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_continues_after_a_cache_given_either_way(name):
    """transformers >= 5.24 passes the cache to forward as ``cache=``, older 5.x as ``past_key_values=``;
    either way decoding must continue where the cache ends (not restart at position 0), and the cache
    must come back where generate() looks for it (its own _update_model_kwargs_for_generation)."""
    model, _ = _model("hgf")
    hf = HGFForCausalLM.from_transformer(model).eval()
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(idx)
        out = hf(idx[:, :6], use_cache=True)
        assert torch.allclose(out.logits, ref[:, :6], atol=1e-5)
        (cache,) = _cache_for_next_step(hf, out)
        assert cache is not None and cache.get_seq_length() == 6
        step = hf(idx[:, 6:8], **{name: cache}, use_cache=True)
        assert torch.allclose(step.logits, ref[:, 6:8], atol=1e-5)
        assert _cache_for_next_step(hf, step) == [cache]
        assert cache.get_seq_length() == 8
        with pytest.raises(ValueError, match="not both"):
            hf(idx[:, 8:], cache=cache, past_key_values=DynamicCache(config=hf.config))


def test_forward_loss_and_padding_refused():
    model, _ = _model("hgf")
    hf = HGFForCausalLM.from_transformer(model)
    idx = torch.randint(0, 256, (2, 10))
    out = hf(idx, labels=idx, use_cache=False)
    assert torch.allclose(out.loss, lm_loss(model(idx)[:, :-1], idx[:, 1:]))
    mask = torch.ones_like(idx)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(idx, attention_mask=mask)


def test_config_derives_standard_attributes_from_hgf_dict():
    _, cfg = _model("hgf", "--model.n_layers=3")
    c = HGFPreTrainedConfig.from_hgf(cfg)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.max_position_embeddings) == (256, 64, 3, 64)
    with pytest.raises(HGFError, match="model.linear"):
        HGFPreTrainedConfig(hgf_config={"model": {"linear": "ternary"}})


def test_checkpoint_missing_a_tensor_is_refused(tmp_path):
    model, _ = _model("hgf")
    HGFForCausalLM.from_transformer(model).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.attn.q_proj.A"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HGFError, match="lacks 1 hgf parameters"):
        HGFForCausalLM.from_pretrained(tmp_path)


def _run_dir(path, arm="hgf"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model, cfg = _model(arm, "--model.vocab_size=320")  # >= the tokenizer's 280 ids
    save_config(cfg, path)
    save_weights(model, path / "model.safetensors")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["once upon a time there was a little cat"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    return model


def test_convert_run_to_hf_and_back(tmp_path, capsys):
    run, hfdir, run2 = tmp_path / "run", tmp_path / "hf", tmp_path / "run2"
    model = _run_dir(run)
    assert main(["convert", str(run), "--to", "hf", str(hfdir)]) == 0
    assert main(["convert", str(hfdir), "--to", "run", str(run2)]) == 0
    assert "(hf) ->" in capsys.readouterr().out
    assert (run / "config.json").read_bytes() == (run2 / "config.json").read_bytes()
    assert (run / "tokenizer.json").read_bytes() == (run2 / "tokenizer.json").read_bytes()
    back, _ = load_trained(run2)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    tok = AutoTokenizer.from_pretrained(hfdir)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    hf = AutoModelForCausalLM.from_pretrained(hfdir)
    assert hf.generation_config.eos_token_id == 0
    ids = tok("once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))


def test_convert_refuses_existing_output_and_stray_overrides(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    _run_dir(run)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(run), "--to", "hf", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "o2"), "--model.linear=hgf"]) == 2
    assert "only to --from bitnet" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_require_transformers_refuses_versions_below_the_tested_minimum(monkeypatch):
    import transformers

    from hgf.hf import require_transformers

    monkeypatch.setattr(transformers, "__version__", "5.3.0")
    with pytest.raises(HGFError, match=r"transformers >= 5\.4 \(found 5\.3\.0\)"):
        require_transformers()
    monkeypatch.setattr(transformers, "__version__", "5.10.0.dev0")
    require_transformers()
