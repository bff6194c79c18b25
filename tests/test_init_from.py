"""``--init.from``: a ternary (or dense) model initialised from a full-precision run. The config
takes the source's architecture; the dense arm equals the source before training; the bitnet
arm's latent weights are the source's; HGF's A, B are the residual SVD (or B = 0); SubLN is
calibrated to the identity, weight 1 or off; mismatches fail with one line; a resumed run never
re-reads the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convert_kit import arm_config, train_source
from hgf.cli import main
from hgf.config import replace
from hgf.errors import HGFError
from hgf.model import HGFLinear, build_model, ternarize
from hgf.runs import load_trained, save_config, save_weights
from hgf.train import train
from hgf.train.checkpoint import Checkpointer
from hgf.train.init_from import (
    calibration_batches,
    initialise,
    load_train_config,
    model_initialiser,
)
from hgf.train.loop import build_trainer
from hgf.train.metrics import read_metrics
from trainkit import ROOT, tiny_config

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory, dataset) -> Path:
    return train_source(tmp_path_factory.mktemp("init_from") / "fp", dataset)


def initialised(cfg, dataset_tokens=None):
    """A model built from ``cfg`` and initialised from its init.from source (CPU)."""
    from hgf.data import prepare

    tokens = prepare(cfg, progress=False).tokens("train") if dataset_tokens is None else dataset_tokens
    tr = build_trainer(cfg, tokens, torch.device("cpu"),
                       model_initialiser(cfg, tokens, "cpu", note=False))
    return tr.model.eval()


def ids(n=3, t=16):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(3))


def test_config_takes_the_source_architecture(tmp_path, dataset, source):
    cfg = arm_config(tmp_path, dataset, "bitnet", source)
    src = load_trained(source)[1].model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        assert getattr(cfg.model, key) == getattr(src, key), key
    assert cfg.model.linear == "bitlinear" and cfg.init.from_ == str(source)
    assert Path(cfg.data.tokenizer) == (source / "tokenizer.json").resolve()
    assert arm_config(tmp_path, dataset, "bitnet", source, "--model.d_model=32").model.d_model == 32
    assert arm_config(tmp_path, dataset, "bitnet", source, "--init.subln=off").model.subln == "off"
    assert arm_config(tmp_path, dataset, "bitnet", source,
                      "--model.max_seq_len=24").model.max_seq_len == 24  # may differ
    bare = load_train_config(ROOT / "configs" / "bitnet.toml", [f"--init.from={source}"])
    assert (bare.model.max_seq_len, bare.train.seq_len) == (32, 32)  # 128 would not fit
    for arm, over, msg in [
        ("bitnet", ["--model.d_model=64"], r"model.d_model=64 does not match .* source's 32"),
        ("hgf", [], r"configs/hgf.toml: model.attention='differential' does not match"),
        ("bitnet", ["--model.n_kv_heads=2"], r"model.n_kv_heads=2 does not match"),
        ("bitnet", ["--init.subln=off", "--model.subln=on"], "contradicts init.subln=off"),
        ("bitnet", ["--init.from=" + str(tmp_path)], "config.json not found"),
    ]:
        with pytest.raises(HGFError, match=msg) as e:
            arm_config(tmp_path, dataset, arm, source, *over)
        assert "\n" not in str(e.value)


def test_dense_arm_equals_the_source_before_training(tmp_path, dataset, source):
    ref, _ = load_trained(source)
    model = initialised(arm_config(tmp_path, dataset, "fp16", source))
    want, got = ref.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(model(ids()), ref(ids()))
    # end to end through the CLI: with lr = 0 the trained weights stay the source's, bit for bit
    data, cache = dataset
    assert main(["train", str(ROOT / "configs" / "fp16.toml"), f"--init.from={source}",
                 "--train.lr=0", "--train.steps=2", "--train.batch_size=2", "--train.seq_len=16",
                 "--train.progress=false", "--eval.every=0", "--eval.full_at_end=false",
                 f"--train.out_dir={tmp_path / 'cli'}", f"--data.path={data}",
                 f"--data.cache_dir={cache}"]) == 0
    a, b = (load_file(str(p / "model.safetensors")) for p in (source, tmp_path / "cli"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bitnet_arm_starts_from_the_fp_latent_weights(tmp_path, dataset, source):
    ref, _ = load_trained(source)
    model = initialised(arm_config(tmp_path, dataset, "bitnet", source, "--init.subln=off"))
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():  # the post-training ternarization of the source: close, not equal
        a, b = model(ids()), ref(ids())
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert not torch.equal(a, b) and cos > 0.7, float(cos)


@pytest.mark.parametrize("arm", ["tequila", "sherry"])
def test_tequila_and_sherry_start_from_the_fp_latent_weights(tmp_path, dataset, source, arm):
    """Every source tensor is copied; Tequila's λ keeps its init (its role is "bias") and a
    Tequila source's λ is dropped when the target is a BitLinear."""
    ref, _ = load_trained(source)
    cfg = arm_config(tmp_path / "a", dataset, arm, source, "--init.subln=off")
    model = initialised(cfg)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    extra = sorted(set(ours) - set(theirs))
    if arm == "tequila":
        assert extra and all(k.endswith(".bias_lambda") for k in extra)
        lam = torch.tensor(cfg.tequila.bias_scale, dtype=torch.float32)
        assert all(torch.equal(ours[k], lam) for k in extra)
        (tmp_path / "teq").mkdir()  # a tequila run as the source of a bitnet one
        save_weights(model, tmp_path / "teq" / "model.safetensors")
        save_config(cfg, tmp_path / "teq")
        (tmp_path / "teq" / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
        back = initialised(arm_config(tmp_path / "b", dataset, "bitnet", tmp_path / "teq",
                                      "--init.subln=off"))
        assert set(back.state_dict()) == set(theirs)
    else:
        assert extra == []


def _mean_rms_by_hand(ref, module: str, batches) -> float:
    seen = []
    h = ref.get_submodule(module).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].float().pow(2).mean(-1).sqrt().flatten()))
    with torch.no_grad():
        for b in batches:
            ref(b)
    h.remove()
    return float(torch.cat(seen).mean())


def test_subln_identity_is_calibrated_and_closer_than_ones(tmp_path, dataset, source):
    from hgf.data import prepare

    ref, _ = load_trained(source)
    cfgs = {mode: arm_config(tmp_path, dataset, "fp16", source, "--model.subln=on",
                             f"--init.subln={mode}", "--init.calib_batches=2")
            for mode in ("identity", "ones")}
    tokens = prepare(cfgs["ones"], progress=False).tokens("train")
    models = {mode: initialised(cfg, tokens) for mode, cfg in cfgs.items()}
    calib = calibration_batches(tokens, 4, 16, 2)
    for norm, proj in [("layers.0.attn.subln", "layers.0.attn.o_proj"),
                       ("layers.1.mlp.subln", "layers.1.mlp.down_proj")]:
        w = models["identity"].get_submodule(norm).weight
        assert torch.allclose(w, torch.full_like(w, _mean_rms_by_hand(ref, proj, calib)),
                              rtol=1e-5)
        assert torch.equal(models["ones"].get_submodule(norm).weight, torch.ones_like(w))
    with torch.no_grad():
        want = ref(ids())
        err = {m: float((model(ids()) - want).abs().mean()) for m, model in models.items()}
    assert err["identity"] < 0.5 * err["ones"], err


def test_hgf_correction_svd_and_lora_init(tmp_path, dataset, source):
    ref, _ = load_trained(source)
    over = ("--init.subln=off", "--hgf.rank=4")
    svd = initialised(arm_config(tmp_path, dataset, "hgf_std", source, "--hgf.init=svd", *over))
    lora = initialised(arm_config(tmp_path, dataset, "hgf_std", source, *over))
    bitnet = initialised(arm_config(tmp_path, dataset, "bitnet", source, "--init.subln=off"))
    theirs = ref.state_dict()
    for name, mod in svd.named_modules():
        if not isinstance(mod, HGFLinear):
            continue
        w = theirs[f"{name}.weight"]
        assert torch.equal(mod.weight, w)  # latent weight = the FP weight
        w_t, s = ternarize(w)
        u, sv, vh = torch.linalg.svd(w - w_t / s, full_matrices=False)
        best = (u[:, :4] * sv[:4]) @ vh[:4]  # the top-4 SVD of the quantization residual
        with torch.no_grad():
            torch.testing.assert_close(mod.gate_value() * mod.B @ mod.A, best, rtol=0, atol=1e-5)
        lora_mod = lora.get_submodule(name)
        assert torch.equal(lora_mod.B, torch.zeros_like(lora_mod.B))
        assert float(lora_mod.gate_value().detach()) == pytest.approx(0.1, rel=1e-5)
    with torch.no_grad():
        want = ref(ids())
        err = {k: float((m(ids()) - want).abs().mean())
               for k, m in (("svd", svd), ("lora", lora), ("bitnet", bitnet))}
        assert torch.equal(lora(ids()), bitnet(ids()))  # B = 0: exactly the ternarized source
    assert err["svd"] < err["bitnet"], err


def _hgf_source(path: Path, rank: int) -> Path:
    cfg = tiny_config(path, (path, path), "hgf_std", f"--hgf.rank={rank}")
    path.mkdir(parents=True)
    save_config(cfg, path)
    save_weights(build_model(cfg), path / "model.safetensors")
    return path


def test_mismatches_fail_with_one_line(tmp_path, dataset, source):
    src = _hgf_source(tmp_path / "h4", rank=4)
    src_model, src_cfg = load_trained(src)
    cfg = arm_config(tmp_path, dataset, "hgf_std", src, "--hgf.rank=8", "--model.subln=on")
    with pytest.raises(HGFError, match=r"layers.0.attn.q_proj.A has shape \(4, 32\) in the "
                                       r"source, \(8, 32\) here") as e:
        initialise(build_model(cfg), cfg, src_model, src_cfg)
    assert "\n" not in str(e.value)
    # an HGF source into a bitnet model: the correction is dropped and said so
    cfg = arm_config(tmp_path, dataset, "bitnet", src, "--model.subln=on")
    info = initialise(build_model(cfg), cfg, src_model, src_cfg)
    assert len(info["dropped"]) == 14 and info["copied"] > 0
    # a source with SubLN into a model without it
    cfg = arm_config(tmp_path, dataset, "bitnet", src, "--model.subln=off")
    with pytest.raises(HGFError, match="the source has SubLN norms"):
        initialise(build_model(cfg), cfg, src_model, src_cfg)
    # a programmatic config whose architecture differs
    ref, ref_cfg = load_trained(source)
    cfg = replace(arm_config(tmp_path, dataset, "bitnet", source), model={"d_ff": 96})
    with pytest.raises(HGFError, match=r"model.d_ff=96 does not match the source's 64"):
        initialise(build_model(cfg), cfg, ref, ref_cfg)


def test_init_from_a_llama_folder_equals_init_from_the_run(tmp_path, dataset, source):
    pytest.importorskip("transformers")
    assert main(["convert", str(source), "--to", "llama", str(tmp_path / "llama")]) == 0
    a = initialised(arm_config(tmp_path, dataset, "bitnet", source))
    b = initialised(arm_config(tmp_path, dataset, "bitnet", tmp_path / "llama"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def test_resumed_run_does_not_reinitialise(tmp_path, dataset, source, monkeypatch, capsys):
    import hgf.train.init_from as init_from

    src = source
    over = ("--hgf.init=svd", "--hgf.rank=2", "--train.ckpt_every=3")
    full = train(arm_config(tmp_path / "a", dataset, "hgf_std", src, *over))
    assert "initialised from" in capsys.readouterr().err

    save = Checkpointer.save

    def save_then_interrupt(self, step, *args):
        path = save(self, step, *args)
        if step == 3:
            raise KeyboardInterrupt
        return path

    cfg = arm_config(tmp_path / "b", dataset, "hgf_std", src, *over)
    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(Checkpointer, "save", save)
    assert "initialised from" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run read its init.from source")

    monkeypatch.setattr(init_from, "load_source_model", refuse)  # what reads the weights
    monkeypatch.setattr(init_from, "initialise", refuse)
    resumed = train(cfg)
    assert resumed.resumed_from == 3 and "initialised from" not in capsys.readouterr().err
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full.step == resumed.step == 6
    # `hgf train RUN_DIR` continues it (here: extends it by 2 steps), still without the source
    assert main(["train", str(tmp_path / "b"), "--train.steps=8"]) == 0
    assert max(_losses(tmp_path / "b")) == 8
