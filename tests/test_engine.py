"""The native decoder (hgf.infer.engine, kernels/csrc/decode_cpu.cpp) against the PyTorch
Transformer, the one definition of the model: the same greedy tokens for every arm and packing
(golden tests), the same logits to float rounding, prefill == one token at a time, and the
fallback to the reference path with its one-line notice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hgf.config import load_config
from hgf.errors import HGFError
from hgf.infer import export_model, generate_ids, load_packed
from hgf.infer.engine import (
    OPT_HEAD_ROWS4,
    OPT_NO_UNPACK,
    OPT_SPLIT_CORR,
    OPT_SPLIT_PROJ,
    OPT_TWO_PASS_DIFF,
    NativeModel,
    load_for_decode,
    native_for,
)
from hgf.kernels import cpu
from hgf.model import HGFLinear, build_model
from infer_utils import ROOT, make_tokenizer, train_tiny

pytestmark = pytest.mark.skipif(not cpu.load(), reason="the C++ kernel library is not built")

# bitlinear + standard, HGF + standard, HGF + differential, Tequila (+ its folded bias) + standard
ARMS = ["bitnet", "hgf_std", "hgf", "tequila"]
# every arm in i2 and tq1; Sherry (3:4) in its own packing and in i2
ARM_PACKINGS = [(a, p) for a in ARMS for p in ("i2", "tq1")] + [("sherry", "sherry"),
                                                                 ("sherry", "i2")]
PROMPTS = ["Once upon a time", "Tom and", "Ça"]
# Native vs reference logits on the same packed model: the same int8 codes and integer sums, the
# float parts summed in another order (~3e-7 of max |logit| measured); an activation that lands on
# an int8 rounding boundary may round the other way (one code; measured up to 6e-4).
MAX_TOL, MEAN_TOL = 1e-2, 1e-4  # × max |logit|
# Random-weight models have no margins: one flipped code moves later logits by up to ~1% (a 1e-7
# relative perturbation of the reference's own embeddings moves them as much, measured).
RANDOM_MAX_TOL, RANDOM_MEAN_TOL = 3e-2, 3e-3


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    scale = a.abs().max()
    return float((a - b).abs().max() / scale), float((a - b).abs().mean() / scale)


def _exported(arm: str, packing: str, folder: Path, embeddings: str = "fp16"):
    model, cfg, _ = train_tiny(arm)
    path = folder / f"{arm}_{packing}.hgf"
    export_model(model, cfg, path, packing, embeddings=embeddings)
    return path, cfg


@pytest.mark.parametrize("arm,packing", ARM_PACKINGS)
def test_native_greedy_equals_reference(arm: str, packing: str, tmp_path: Path) -> None:
    path, cfg = _exported(arm, packing, tmp_path)
    ref, _ = load_packed(path)
    if cfg.model.linear == "hgf":  # the correction is real work: trained B' != 0
        assert all(m.B_t.abs().max() > 0 for m in ref.modules() if getattr(m, "B_t", None) is not None)
    natives = [NativeModel.from_file(path), NativeModel.from_model(ref)]
    tok = make_tokenizer()
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        want = generate_ids(ref, ids, max_new_tokens=24, native=False).ids
        assert len(want) > 5
        for nat in natives:
            assert generate_ids(nat, ids, max_new_tokens=24).ids == want, (nat.source, prompt)
        x = torch.tensor([ids + want])
        with torch.no_grad():
            ref_logits = ref(x)
        for nat in natives:
            gap_max, gap_mean = _gap(ref_logits, nat(x))
            assert gap_max <= MAX_TOL and gap_mean <= MEAN_TOL, (nat.source, gap_max, gap_mean)


def test_generate_on_a_packed_transformer_runs_natively(tmp_path: Path, monkeypatch) -> None:
    path, _ = _exported("hgf", "i2", tmp_path)
    ref, _ = load_packed(path)
    assert native_for(ref) is not None and native_for(train_tiny("hgf")[0]) is None
    calls = []
    run = NativeModel.forward
    monkeypatch.setattr(NativeModel, "forward", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    ids = generate_ids(ref, [5, 17, 42], max_new_tokens=10).ids
    assert len(calls) == 10  # prefill + 9 decode steps, all native
    assert ids == generate_ids(ref, [5, 17, 42], max_new_tokens=10, native=False).ids


def _random_packed(tmp_path: Path, overrides: list[str], packing: str = "i2",
                   embeddings: str = "fp16") -> Path:
    """A debug-size HGF model with random weights and a nonzero correction (B != 0)."""
    cfg = load_config(ROOT / "configs" / "hgf.toml", ["--model.vocab_size=320", *overrides])
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HGFLinear):
                m.B.normal_(0.0, 0.3)
    path = tmp_path / "r.hgf"
    export_model(model, cfg, path, packing, embeddings=embeddings)
    return path


@pytest.mark.parametrize("variant", [
    ["--model.mlp=relu2", "--model.tie_embeddings=true"],
    ["--hgf.targets=mlp", "--model.subln=off"],
    ["--hgf.targets=attention", "--model.attention=standard", "--model.n_heads=2"],
    ["--model.attention=standard", "--model.n_kv_heads=2", "--model.tie_embeddings=true"],  # GQA
    ["--hgf.rank=3", "--model.d_model=80", "--model.d_ff=150"],  # rows not multiples of 4/64
    ["--hgf.rank=5", "--model.d_model=80", "--model.d_ff=150"],  # the same in i2
])
@pytest.mark.parametrize("embeddings", ["fp16", "int8"])
def test_native_config_variants(variant: list[str], embeddings: str, tmp_path: Path) -> None:
    path = _random_packed(tmp_path, variant, "tq1" if "--hgf.rank=3" in variant else "i2",
                          embeddings)
    ref, header = load_packed(path)
    nat = NativeModel.from_file(path)
    x = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x)
    gap_max, gap_mean = _gap(want, nat(x))
    assert gap_max <= RANDOM_MAX_TOL and gap_mean <= RANDOM_MEAN_TOL
    prompt = x[0, :6].tolist()
    assert (generate_ids(nat, prompt, max_new_tokens=16).ids
            == generate_ids(ref, prompt, max_new_tokens=16, native=False).ids)


def test_prefill_equals_one_token_at_a_time_and_options_agree(tmp_path: Path) -> None:
    path, _ = _exported("hgf", "tq1", tmp_path)
    nat = NativeModel.from_file(path)
    ids = torch.randint(0, 320, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    full = nat(torch.tensor([ids]))[0]  # [30, vocab], one batched prefill
    for opts in (0, OPT_SPLIT_PROJ, OPT_SPLIT_CORR, OPT_TWO_PASS_DIFF, OPT_NO_UNPACK,
                 OPT_HEAD_ROWS4, 15 | OPT_HEAD_ROWS4):
        nat.set_options(opts)
        nat.setup_caches(30)
        steps = [nat.forward(ids[:13], 0, all_logits=True)]  # odd: a token pair and one
        steps += [nat.forward([ids[t]], t) for t in range(13, 30)]
        nat.clear_caches()
        gap_max, _ = _gap(full, torch.cat(steps))
        assert gap_max <= 1e-5, (opts, gap_max)
    nat.set_options(0)


@pytest.mark.parametrize("setting", ["portable", "threads"])
def test_native_other_isa_and_threads(setting: str, tmp_path: Path) -> None:
    path, _ = _exported("hgf", "i2", tmp_path)
    ref, _ = load_packed(path)
    nat = NativeModel.from_file(path)
    prompt = [5, 17, 42, 7]
    want = generate_ids(ref, prompt, max_new_tokens=20, native=False).ids
    x = torch.tensor([prompt + want])
    with torch.no_grad():
        ref_logits = ref(x)
    before_isa, before_threads = cpu.isa(), torch.get_num_threads()
    try:
        if setting == "portable":
            cpu.isa("portable")  # the decoder's portable loops and the portable ternary kernels
        else:
            torch.set_num_threads(2)  # every op split over the pool
        assert generate_ids(nat, prompt, max_new_tokens=20).ids == want
        gap_max, gap_mean = _gap(ref_logits, nat(x))
        assert gap_max <= MAX_TOL and gap_mean <= MEAN_TOL
    finally:
        cpu.isa(before_isa)
        torch.set_num_threads(before_threads)


def test_fallback_says_why_once(tmp_path: Path, capsys, monkeypatch) -> None:
    path, _ = _exported("bitnet", "i2", tmp_path)
    model, _ = load_for_decode(path)
    assert isinstance(model, NativeModel) and capsys.readouterr().err == ""
    monkeypatch.setenv("HGF_NO_NATIVE_DECODER", "1")
    model, _ = load_for_decode(path)
    assert not isinstance(model, NativeModel)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HGF_NO_NATIVE_DECODER is set" in err and "reference" in err
    a = generate_ids(model, [5, 6], max_new_tokens=5).ids
    b = generate_ids(model, [5, 6], max_new_tokens=5).ids
    assert a == b and capsys.readouterr().err == ""  # said once, at load
    packed = load_packed(path)[0]
    generate_ids(packed, [5, 6], max_new_tokens=2)
    generate_ids(packed, [5, 6], max_new_tokens=2)
    assert capsys.readouterr().err.count("\n") == 1  # a packed Transformer: once per model
    with pytest.raises(HGFError, match="native decoder cannot run"):
        generate_ids(model, [5, 6], max_new_tokens=2, native=True)
    monkeypatch.delenv("HGF_NO_NATIVE_DECODER")
    dense = load_config(ROOT / "configs" / "diff_only.toml", ["--model.vocab_size=320"])
    export_model(build_model(dense), dense, tmp_path / "d.hgf")
    model, _ = load_for_decode(tmp_path / "d.hgf")
    assert not isinstance(model, NativeModel)
    assert "model.linear=dense" in capsys.readouterr().err
    with pytest.raises(HGFError, match="the Transformer"):
        generate_ids(NativeModel.from_file(path), [5], max_new_tokens=2, native=False)


def test_native_checks_its_inputs(tmp_path: Path) -> None:
    path, cfg = _exported("bitnet", "i2", tmp_path)
    nat = NativeModel.from_file(path)
    with pytest.raises(RuntimeError, match="setup"):
        nat.forward([1], 0)
    nat.setup_caches(8)
    with pytest.raises(RuntimeError, match="do not fit the cache"):
        nat.forward([1, 2, 3], 6)
    with pytest.raises(RuntimeError, match="out of range"):
        nat.forward([cfg.model.vocab_size], 0)
    nat.clear_caches()
    ref = load_packed(path)[0]
    assert native_for(ref.to(torch.bfloat16)) is None  # not float32: the reference path


@pytest.mark.parametrize("arm", ["bitnet", "hgf"])
def test_f16_kv_cache_halves_the_cache_and_stays_close(arm: str, tmp_path: Path) -> None:
    """``kv_cache = "f16"``: the cache holds fp16 (half the bytes); logits stay within fp16
    rounding of the float32 cache's, and prefill equals one token at a time (same stored values)."""
    path, _ = _exported(arm, "i2", tmp_path)
    nat = NativeModel.from_file(path)
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    logits, sizes = {}, {}
    for kv in ("f32", "f16"):
        nat.kv_cache = kv
        assert nat.kv_cache == kv
        nat.setup_caches(24)
        sizes[kv] = nat.cache_bytes()
        logits[kv] = nat.forward(ids, 0, all_logits=True)
        nat.clear_caches()
    assert sizes["f16"] * 2 == sizes["f32"]
    gap_max, gap_mean = _gap(logits["f32"], logits["f16"])
    assert 0 < gap_max <= RANDOM_MAX_TOL and gap_mean <= RANDOM_MEAN_TOL, (gap_max, gap_mean)
    nat.setup_caches(24)  # still f16
    steps = [nat.forward(ids[:9], 0, all_logits=True)]
    steps += [nat.forward([ids[t]], t) for t in range(9, 24)]
    assert _gap(logits["f16"], torch.cat(steps))[0] <= 1e-5
    with pytest.raises(HGFError, match="KV cache type 'bf16'"):
        nat.kv_cache = "bf16"


def test_generate_with_an_f16_kv_cache(tmp_path: Path, capsys) -> None:
    from hgf.cli import main

    path, _ = _exported("bitnet", "i2", tmp_path)
    model, _ = load_for_decode(path, kv_cache="f16")
    assert model.kv_cache == "f16"
    with pytest.raises(HGFError, match="KV cache type"):
        load_for_decode(path, kv_cache="f8")
    assert main(["generate", str(tmp_path), "--prompt", "a", "--kv-cache", "f16"]) == 2
    assert "--kv-cache applies to a packed file" in capsys.readouterr().err


def test_sherry_prompt_unpacks_rows_like_the_packed_kernel(tmp_path: Path) -> None:
    """Prompts of a sherry model (inputs in whole 128-weight blocks) unpack each row block once
    into codes in its planes' order; the integers equal the packed kernel's (OPT_NO_UNPACK)."""
    from hgf.infer.decode_bench import export_arm

    path = export_arm("tiny", "sherry-std", 8, ["sherry"], "fp16", tmp_path)["sherry"]
    nat = NativeModel.from_file(path)
    assert nat.cfg.model.d_model % 128 == 0 and nat.cfg.model.d_ff % 128 == 0
    ids = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    out = {}
    for opts in (0, OPT_NO_UNPACK):
        nat.set_options(opts)
        out[opts] = nat(torch.tensor([ids]))[0]
    nat.set_options(0)
    assert _gap(out[OPT_NO_UNPACK], out[0])[0] <= 1e-5
