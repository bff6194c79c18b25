"""LR/WD schedules at chosen steps, and the AdamW parameter groups."""

import math

import pytest
import torch

from hgf.config import load_config
from hgf.model import build_model
from hgf.train.optim import build_optimizer
from hgf.train.schedule import Schedule
from trainkit import ROOT

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _sched(*over: str) -> Schedule:
    return Schedule(load_config(None, list(over)).train)


def test_cosine_warmup_then_decay_to_min():
    s = _sched("--train.lr=1e-3", "--train.steps=110", "--train.warmup_steps=10",
               "--train.min_lr_frac=0.1", "--train.schedule=cosine")
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(4) == pytest.approx(5e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(10) == pytest.approx(1e-3)  # peak right after warmup
    assert s.lr_at(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the cosine
    assert s.lr_at(35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.lr_at(109) > 1e-4 and s.lr_at(110) == pytest.approx(1e-4)
    assert all(s.wd_at(k) == pytest.approx(0.1) for k in (0, 55, 109))


def test_two_stage_drops_lr_and_weight_decay_halfway():
    s = _sched("--train.lr=1.5e-3", "--train.steps=100", "--train.warmup_steps=5",
               "--train.schedule=two_stage", "--train.weight_decay=0.1")
    assert s.lr_at(0) == pytest.approx(3e-4)
    assert s.lr_at(5) == s.lr_at(49) == pytest.approx(1.5e-3)
    assert s.lr_at(50) == s.lr_at(99) == pytest.approx(1e-3)
    assert s.wd_at(49) == pytest.approx(0.1)
    assert s.wd_at(50) == s.wd_at(99) == 0.0


def test_constant_and_no_warmup():
    s = _sched("--train.lr=2e-3", "--train.warmup_steps=0", "--train.schedule=constant")
    assert s.lr_at(0) == s.lr_at(150) == pytest.approx(2e-3)


def test_param_groups_no_decay_on_norms_gates_embeddings():
    cfg = load_config(ROOT / "configs" / "hgf.toml",
                      ["--hgf.gate_lr_mult=5", "--train.weight_decay=0.1", "--train.lr=1e-3",
                       "--train.schedule=two_stage", "--train.warmup_steps=0"])
    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == len(dict(model.named_parameters()))  # every parameter exactly once
    kinds = {"norm": 0, "emb": 0, "gate": 0, "proj": 0}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            g = group_of[id(p)]
            if isinstance(mod, (torch.nn.RMSNorm, torch.nn.Embedding)):
                kinds["norm" if isinstance(mod, torch.nn.RMSNorm) else "emb"] += 1
                assert g["name"] == "no_decay" and g["weight_decay"] == 0.0, mod_name
            elif p_name == "gate":
                kinds["gate"] += 1
                assert g["name"] == "gate" and g["weight_decay"] == 0.0 and g["lr_mult"] == 5
            elif isinstance(mod, torch.nn.Linear):
                kinds["proj"] += 1
                assert g["name"] == "decay" and g["weight_decay"] == 0.1, f"{mod_name}.{p_name}"
    assert kinds["gate"] == 14 and kinds["emb"] == 1 and kinds["norm"] > 0 and kinds["proj"] > 0
    sched = Schedule(cfg.train)
    sched.apply(opt, 0)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"decay": 1e-3, "no_decay": 1e-3, "gate": 5e-3})
    sched.apply(opt, cfg.train.steps // 2)  # second stage: WD 0 on the decay group only
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {
        "decay": 0.0, "no_decay": 0.0, "gate": 0.0}


def test_correction_group_lr_mult_and_no_decay():
    base = ["--train.weight_decay=0.1", "--train.lr=1e-3", "--train.warmup_steps=0",
            "--train.schedule=constant"]
    cfg = load_config(ROOT / "configs" / "hgf.toml", base)
    names = [g["name"] for g in build_optimizer(build_model(cfg), cfg).param_groups]
    assert "correction" not in names  # defaults: A/B share the decay group (same layout as before)
    cfg = load_config(ROOT / "configs" / "hgf.toml",
                      [*base, "--hgf.lr_mult=4", "--hgf.decay=false"])
    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    Schedule(cfg.train).apply(opt, 0)
    groups = {g["name"]: g for g in opt.param_groups}
    ab = {id(p) for n, p in model.named_parameters() if n.endswith((".A", ".B"))}
    assert ab and {id(p) for p in groups["correction"]["params"]} == ab
    assert groups["correction"]["lr"] == pytest.approx(4e-3)
    assert groups["correction"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert not ab & {id(p) for p in groups["decay"]["params"]}


def test_adamw_with_zero_lr_leaves_parameters_bitwise_unchanged():
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    for lr in (1e-2, 0.0, 0.0):
        before = p.detach().clone()
        for g in opt.param_groups:
            g["lr"] = lr
        p.grad = torch.randn(5)
        opt.step()
        assert torch.equal(p, before) == (lr == 0.0)
