"""Golden tests against the real llama.cpp (llama-cpp-python's low-level API; skipped when
``llama_cpp`` is not installed): tiny trained ``bitnet`` and ``hgf_std`` models exported to GGUF
give llama.cpp's tokenizer the same ids, the same logits within the tolerance derived below, and
the same greedy text, with the HGF correction as a LoRA adapter.

Tolerance. llama.cpp and hgf differ in one piece of arithmetic: the activation quantizer of the
ternary matmuls (llama.cpp: q8_K, one int8 scale per 256 values; hgf: one per token). So

  * exact-arithmetic check: with F32 embeddings and float32 attention (f32 KV cache, no flash
    attention), llama.cpp's logits equal hgf's computed with the q8_K quantizer
    (gguf_utils.llama_cpp_activations) up to float32 summation order: ``TOL_ARITH`` = 1e-4 ×
    max|logit| per position (measured: median 2e-7, max 1.4e-6), except where an ulp-level
    difference moves an activation code across a rounding boundary (a "flip", as in
    test_bitnet_export), which moves that position and, through attention, the later ones by up
    to ``TOL_FLIP`` = 5e-3 × max|logit| (measured: ≤ 2e-3). Where a flip happens depends on the
    machine's float32 rounding (one machine flipped at position 6 of 48, another nowhere), so
    the sequence is compared as ``WINDOWS`` independent windows, each in a fresh context: a flip
    moves only the rest of its window, and the median position over all windows stays within
    ``TOL_ARITH`` unless most windows flip early;
  * native check: llama.cpp vs hgf's own (per-token) model differs by no more than hgf's two
    quantizers differ from each other on the same input (``D_q`` = max|hgf_q8K − hgf_native|,
    measured in the test: ~1% of max|logit| here) plus ``TOL_FLIP``;
  * default files (F16 embeddings, f16 KV cache) against hgf's packed runtime (which also stores
    F16 embeddings): the same greedy tokens and text, 32 tokens on three prompts.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gguf_utils import GGUF_DIMS, gguf_model, llama_cpp_activations
from hgf.data.tokenizer import train_bpe
from hgf.gguf.export import export_model_gguf
from hgf.infer.export import export_model
from hgf.infer.generate import generate_ids
from hgf.infer.packed import load_packed
from hgf.model import build_model
from hgf.model.hgf_linear import hgf_layers
from infer_utils import corpus_ids, make_tokenizer
from trainkit import make_stories

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
from hgf.gguf.llama import LlamaCpp  # noqa: E402

TOL_ARITH = 1e-4  # × max|logit|: float32 summation order (llama.cpp vs torch)
TOL_FLIP = 5e-3  # × max|logit|: what an int8 activation code flipping may move a position by
PROMPTS = ["Once upon a time", "Tom and Lily went", "Ça va?"]
WORDS = ["the", "dog", "don't", "I'll", "we're", "café", "naïve", "日本語", "🙂", "42", "3.14",
         "hello,", "world!", "  ", "\n", "\t", "x'y", "A-B", "(paren)", "über", "--", "...", "it's"]


def _sequence(tok, n: int = 96) -> list[int]:
    ids = corpus_ids(tok).tolist()[:n - 16]
    return ids + torch.randint(1, 300, (16,), generator=torch.Generator().manual_seed(0)).tolist()


WINDOWS = 6  # independent windows the arithmetic check splits a sequence into (docstring)


def _window_errors(lm: LlamaCpp, model, seq: list[int], scale: float) -> np.ndarray:
    """max |llama.cpp − hgf (q8_K activations)| / scale per position, over ``WINDOWS`` windows
    of ``seq`` each evaluated from an empty context on both sides."""
    errs = []
    for window in np.array_split(np.asarray(seq), WINDOWS):
        ids = window.tolist()
        with torch.no_grad(), llama_cpp_activations():
            want = model(torch.tensor([ids]))[0].numpy()
        errs.append(np.abs(lm.logits(ids) - want).max(-1) / scale)
    return np.concatenate(errs)


def _assert_same_arithmetic(per_pos: np.ndarray) -> None:
    assert float(np.median(per_pos)) < TOL_ARITH, f"median {np.median(per_pos):.2e}"
    assert float(per_pos.max()) < TOL_FLIP, f"max {per_pos.max():.2e}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Exports of the trained tiny models, cached per (arm, packing, embeddings)."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(arm: str, packing: str = "i2", embeddings: str = "fp16"):
        key = (arm, packing, embeddings)
        if key not in cache:
            model, cfg, _ = gguf_model(arm)
            out = root / f"{arm}-{packing}-{embeddings}.gguf"
            info = export_model_gguf(model, cfg, out, packing, embeddings, make_tokenizer().to_str())
            cache[key] = (model, cfg, info)
        return cache[key]

    return get


def test_tokenizer_matches_on_stories(tmp_path):
    """A few hundred stories and word-list lines: llama.cpp's ids == hgf's tokenizer ids."""
    stories = make_stories(300, seed=3)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(200)]
    tok = train_bpe(stories + lines, 512)
    cfg_args = [*GGUF_DIMS, "--model.vocab_size=512", "--model.n_layers=1"]
    from hgf.config import load_config

    cfg = load_config("configs/bitnet.toml", cfg_args)
    export_model_gguf(build_model(cfg).eval(), cfg, tmp_path / "t.gguf", tokenizer_json=tok.to_str())
    texts = stories + lines + ["Tom.<|endoftext|>Lily", "Ça va? 日本語 🙂  x\n\n y"]
    with LlamaCpp(tmp_path / "t.gguf", n_ctx=64) as lm:
        for text in texts:
            ids = tok.encode(text).ids
            assert lm.tokenize(text) == ids, text
            assert lm.detokenize(ids) == tok.decode(ids, skip_special_tokens=False), text


@pytest.mark.parametrize("arm,packing", [("bitnet", "i2"), ("bitnet", "tq1"), ("hgf_std", "i2"),
                                         ("hgf_std", "tq1")])
def test_logits_match(files, arm, packing):
    model, cfg, info = files(arm, packing, "fp32")
    seq = _sequence(make_tokenizer())
    idx = torch.tensor([seq])
    with torch.no_grad():
        native = model(idx)[0].numpy()
        with llama_cpp_activations():
            emulated = model(idx)[0].numpy()
    scale = float(np.abs(emulated).max())
    with LlamaCpp(info["model"], info.get("adapter"), n_ctx=128, f32_attention=True) as lm:
        got = lm.logits(seq)
        _assert_same_arithmetic(_window_errors(lm, model, seq, scale))
    assert float((np.abs(got - emulated).max(-1) / scale).max()) < TOL_FLIP  # the whole sequence
    d_q = float(np.abs(emulated - native).max())  # hgf's own quantizer difference
    assert d_q > 10 * TOL_ARITH * scale  # d_ff = 512: two q8_K blocks per down_proj row
    assert float(np.abs(got - native).max()) <= d_q + TOL_FLIP * scale
    assert float((got.argmax(-1) == native.argmax(-1)).mean()) >= 0.95


def test_lora_adapter_is_the_correction(files):
    """llama.cpp without the adapter = hgf's ternary backbone (B := 0); with it = the HGF model."""
    model, cfg, info = files("hgf_std", "i2", "fp32")
    seq = _sequence(make_tokenizer(), 96)
    backbone = build_model(cfg).eval()
    backbone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _, layer in hgf_layers(backbone):
            layer.B.zero_()
        with llama_cpp_activations():
            full = model(torch.tensor([seq]))[0].numpy()
            base = backbone(torch.tensor([seq]))[0].numpy()
    scale = float(np.abs(full).max())
    assert float(np.abs(full - base).max()) > 2 * TOL_FLIP * scale  # the correction matters
    for adapter, want in ((None, backbone), (info["adapter"], model)):
        with LlamaCpp(info["model"], adapter, n_ctx=128, f32_attention=True) as lm:
            _assert_same_arithmetic(_window_errors(lm, want, seq, scale))


@pytest.mark.parametrize("arm", ["bitnet", "hgf_std"])
def test_same_greedy_text(files, tmp_path, arm):
    """Default export (TQ2_0, F16 embeddings, llama.cpp's f16 KV cache) vs hgf's packed runtime:
    the same 32 greedy tokens and the same text on three prompts."""
    model, cfg, info = files(arm)
    tok = make_tokenizer()
    export_model(model, cfg, tmp_path / "m.hgf", "i2")
    packed, _ = load_packed(tmp_path / "m.hgf")
    with LlamaCpp(info["model"], info.get("adapter"), n_ctx=128) as lm:
        for prompt in PROMPTS:
            ids = tok.encode(prompt).ids
            assert lm.tokenize(prompt) == ids
            want = generate_ids(packed, ids, max_new_tokens=32).ids
            got = lm.greedy(ids, 32)
            assert got == want, prompt
            assert lm.detokenize(got) == tok.decode(want, skip_special_tokens=False)


def test_fp16_arm_runs_as_llama(tmp_path):
    """The dense arm as llama.cpp's llama architecture (untied head, Q/K rows permuted for
    NORM RoPE): logits of the model with F16-rounded weights, within llama.cpp's F16 matmul
    (activations rounded to F16 too: ~1e-3 relative)."""
    model, cfg, _ = gguf_model("fp16", tied=False)
    info = export_model_gguf(model, cfg, tmp_path / "d.gguf", "i2", "fp32", make_tokenizer().to_str())
    ref = build_model(cfg).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(p.half().float())
    seq = _sequence(make_tokenizer(), 64)
    with torch.no_grad():
        want = ref(torch.tensor([seq]))[0].numpy()
    with LlamaCpp(info["model"], n_ctx=128, f32_attention=True) as lm:
        got = lm.logits(seq)
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) < 1e-2 * scale
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.95


@pytest.mark.parametrize(("embeddings", "kv"), [("fp16", "f32"), ("int8", "f16")])
def test_bench_peer_smoke(tmp_path, embeddings, kv):
    """Both systems decode the same weights; with int8 embeddings hgf streams int8 rows and
    llama.cpp a Q8_0 head, so that neither reads a wider head than the other; with --kv-cache
    f16 hgf's cache is fp16 as llama.cpp's."""
    import json

    from hgf.infer.bench import main

    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--size", "small", "--tokens", "4", "--prompt-len", "4",
                 "--rounds", "1", "--gemv-sizes", "--dense", "float32", "--threads", "1",
                 "--packings", "tq1", "--embeddings", embeddings, "--kv-cache", kv,
                 "--peer", "llama.cpp",
                 "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["decode"] if "system" in r]
    got = {(r["system"], r["arm"], r["packing"]) for r in rows}
    assert got == {("hgf", a, "tq1") for a in ("bitnet-std", "hgf-std", "hgf-diff")} | {
        ("llama.cpp", a, "tq1_0") for a in ("bitnet-std", "hgf-std")}
    for r in rows:
        assert r["threads"] == 1 and r["cpu_ms_per_token"] > 0 and r["tok_per_s"] > 0
        assert r["prompt_tok_per_s"] > 0 and r["embeddings"] == embeddings
        assert r["kv_cache"] == (kv if r["system"] == "hgf" else "f16")
    assert all("vs_llama_cpp" in r for r in rows if r["system"] == "hgf" and r["arm"] != "hgf-diff")
