"""hgf plan: static bytes against hand-computed values, the activation formula against what
autograd really saves, no allocation on the meta device, the fits decision, the scale presets."""

from pathlib import Path

import pytest
import torch

from hgf.cli import main
from hgf.config import load_config
from hgf.errors import HGFError
from hgf.model import build_model, lm_loss
from hgf.plan import GIB, block_activation_bytes, head_activation_bytes, make_plan, parse_size

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.vocab_size=256", "--train.seq_len=32", "--model.d_ff=160", "--hgf.rank=4"]


def _cfg(arm, *extra):
    return load_config(ROOT / "configs" / f"{arm}.toml", SMALL + list(extra))


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages autograd saves for backward while active (custom autograd
    Functions included), parameters and buffers excluded."""

    def __init__(self, model) -> None:
        skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in skip and st.nbytes():
                self.seen[st.data_ptr()] = st.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def test_static_bytes_equal_hand_computed_values():
    cfg = _cfg("bitnet")  # d 64, f 160, 2 layers, V 256, SubLN on, untied
    d, f, v, L = 64, 160, 256, 2
    block = 4 * d * d + 3 * d * f + 3 * d + f  # 7 projections; attn/mlp norms, 2 SubLNs
    p = 2 * v * d + L * block + d
    plan = make_plan(cfg, gpus=4, gpu_mem=80 * GIB, micro_batch=2, seq_len=32, autocast=True)
    assert (plan.report.total_params, plan.block_params, plan.root_params) == (p, block, 2 * v * d + d)
    ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp2"]
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.optimizer_step) == (4 * p, 4 * p, 8 * p, 4 * p)
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (p, p, 2 * p)
    assert fsdp.gathered == 2 * (2 * v * d + d + 2 * block) + 4 * block
    n = 64
    assert ddp.activations == L * block_activation_bytes(cfg, 2, 32, True) + head_activation_bytes(cfg, n, True)[0]
    assert ddp.peak(False) == 16 * p + ddp.activations + 8 * n * v  # DDP buckets hold the grads


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("arm,extra", [
    ("fp16", []), ("bitnet", []), ("hgf_std", []), ("hgf_std", ["--hgf.fusion=convex"]),
    ("hgf_std", ["--hgf.targets=attention"]), ("bitnet", ["--model.subln=off", "--model.mlp=relu2"]),
    ("fp16", ["--model.subln=on"]), ("hgf", []), ("diff_only", []),
])
def test_activation_formula_equals_what_autograd_saves(arm, extra, autocast):
    cfg = _cfg(arm, *extra)
    differential = cfg.model.attention == "differential"
    if differential and autocast:
        pytest.skip("CPU runs differential heads on the math kernel, in fp32 under autocast")
    model = build_model(cfg)
    b, t = 3, 20
    idx = torch.randint(0, 256, (b, t + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), SavedBytes(model) as saved:
        lm_loss(model(idx[:, :-1]), idx[:, 1:])
    kernel = "math" if differential else "fused"
    want = (cfg.model.n_layers * block_activation_bytes(cfg, b, t, autocast, kernel)
            + head_activation_bytes(cfg, b * t, autocast)[0])
    got = saved.total
    assert 0 <= got - want <= 200  # the rest: 0-d tensors (gates, λ, loss scalars)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_planning_3b_allocates_nothing():
    cfg = load_config(ROOT / "configs/scale/hgf-3b.toml")
    before = _rss()
    plan = make_plan(cfg, gpus=8, gpu_mem=80 * 10**9, micro_batch=4, seq_len=2048)
    assert plan.report.total_params > 3e9  # 12 GB in fp32 if it were allocated
    assert _rss() - before < 200 * 2**20


def test_fits_decision_and_cli(capsys):
    cfg = _cfg("hgf")
    plan = make_plan(cfg, 2, 10**9, 4, 32, "fsdp2", headroom=0.0)
    peak = plan.memory["fsdp2"].peak(False)
    assert make_plan(cfg, 2, int(peak), 4, 32, "fsdp2", headroom=0.0).fits("fsdp2", False)
    assert not make_plan(cfg, 2, int(peak) - 1, 4, 32, "fsdp2", headroom=0.0).fits("fsdp2", False)
    assert plan.memory["fsdp2"].peak(True) < peak  # checkpointing saves memory
    assert main(["plan", str(ROOT / "configs/scale/hgf-1b.toml"), "--gpus", "8", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 on 8 GPU(s): fits only with activation checkpointing" in out
    assert "packed inference size: i2" in out
    assert main(["plan", str(ROOT / "configs/scale/hgf-3b.toml"), "--gpus", "1", "--gpu-mem", "24GiB",
                 "--strategy", "ddp"]) == 0
    assert "DDP on 1 GPU(s): does NOT fit" in capsys.readouterr().out
    assert main(["plan", str(ROOT / "configs/hgf.toml"), "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem 'lots'" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 2**30
    assert parse_size("1.5") == int(1.5 * 2**30)
    with pytest.raises(HGFError):
        parse_size("80 gigs")


def test_scale_presets_land_near_their_sizes():
    for name, lo, hi in (("hgf-1b", 1.15e9, 1.3e9), ("hgf-3b", 2.9e9, 3.1e9)):
        cfg = load_config(ROOT / f"configs/scale/{name}.toml")
        p = make_plan(cfg, 8, 80 * GIB, cfg.train.batch_size, cfg.train.seq_len).report.total_params
        assert lo < p < hi, (name, p)
