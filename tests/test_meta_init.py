"""Meta-device construction (docs/STYLE.md §15): a model built on the meta device, materialised
with ``to_empty`` and initialised by ``init_weights`` equals an eager build bit for bit, for every
arm, every buffer, tied embeddings and the SVD-initialised correction; the 3b preset builds on
meta without allocating its parameters. The sharded (FSDP2, 2 ranks) case is in test_dist.py."""

from __future__ import annotations

import resource

import pytest
import torch
from torch import nn

from hgf.config import load_config
from hgf.model import build_model
from hgf.model.init import reset_own
from hgf.model.transformer import materialize
from trainkit import ARMS, ROOT
from trainkit import small_config as small


def assert_bitwise_equal(a: nn.Module, b: nn.Module) -> None:
    sa = {**dict(a.named_parameters()), **dict(a.named_buffers())}
    sb = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]) or (  # NaN where nothing was measured yet: equal too
            sa[k].isnan().any() and torch.equal(sa[k].nan_to_num(7.0), sb[k].nan_to_num(7.0))), k


def meta_built(cfg, seed: int = 3) -> nn.Module:
    """Meta build, storage full of NaN (or 7s) so that an init that skips a tensor shows, then
    init."""
    torch.manual_seed(seed)
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan") if t.is_floating_point() else 7)
    return materialize(model, "cpu")


def eager_built(cfg, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, device="cpu")


@pytest.mark.parametrize("arm", ARMS)
def test_meta_build_materialised_equals_the_eager_build(arm):
    cfg = small(arm)
    assert_bitwise_equal(meta_built(cfg), eager_built(cfg))
    # the RNG stands where the eager build leaves it (what the trainer draws next is the same)
    torch.manual_seed(3)
    build_model(cfg, device="cpu")
    after_eager = torch.rand(4)
    meta_built(cfg)
    assert torch.equal(torch.rand(4), after_eager)


@pytest.mark.parametrize("over", [
    ("--model.tie_embeddings=true",),
    ("--hgf.init=svd", "--hgf.fusion=convex", "--hgf.gate=tanh"),
    ("--hgf.targets=attention", "--model.mlp=relu2", "--model.subln=off"),
    ("--model.linear=ptqtp", "--model.attention=standard"),
    ("--hgf.gate_mode=channel", "--hgf.init=svd"),
    ("--hgf.gate_mode=input",),
])
def test_meta_build_equals_eager_for_ties_svd_and_other_options(over):
    cfg = small("hgf", *over)
    meta, eager = meta_built(cfg), eager_built(cfg)
    assert_bitwise_equal(meta, eager)
    if cfg.model.tie_embeddings:
        assert meta.lm_head.weight is meta.tok_emb.weight
    if cfg.hgf.init == "svd":
        assert meta.layers[0].attn.q_proj.B.abs().sum() > 0  # the SVD ran (B is not zero)


def test_a_layer_init_weights_does_not_know_is_an_error():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("t", torch.ones(3))

    with pytest.raises(TypeError, match=r"Scale has parameters \(s\) but no reset_own_parameters"):
        reset_own(Scale())
    with pytest.raises(TypeError, match=r"Table has buffers \(t\) but no reset_own_parameters"):
        reset_own(Table())


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_3b_preset_builds_on_meta_without_allocating_its_parameters():
    cfg = load_config(ROOT / "configs" / "scale" / "hgf-3b.toml")
    before = _max_rss_mib()
    model = build_model(cfg, device="meta")
    grown = _max_rss_mib() - before  # a peak: it would show even a freed whole-model allocation
    tensors = [*model.parameters(), *model.buffers()]
    assert sum(p.numel() for p in model.parameters()) > 3e9  # 3.07B = 11.4 GiB in float32
    assert all(t.is_meta for t in tensors)
    assert grown < 64, f"building the 3b preset on meta grew the peak RSS by {grown:.0f} MiB"
