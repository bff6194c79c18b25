"""Distillation (hgf.train.distill): the loss against a hand computation, the trainer's step against
the same loss on the same batch, the frozen teacher, the metrics, and DDP against one process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from convert_kit import arm_config, train_source
from hgf.data import prepare
from hgf.errors import HGFError
from hgf.runs import load_trained
from hgf.train import train
from hgf.train.distill import Distiller, distill_loss, kd_loss
from hgf.train.init_from import model_initialiser
from hgf.train.loop import build_trainer
from hgf.train.metrics import read_metrics

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory, dataset) -> Path:
    return train_source(tmp_path_factory.mktemp("distill") / "fp", dataset)


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def test_distill_loss_equals_a_hand_computed_one():
    zs = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # student logits of 2 tokens over 3 ids
    zt = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]]  # teacher
    y, alpha, T = [1, 2], 0.3, 2.0
    ce = sum(-math.log(_softmax(z)[t]) for z, t in zip(zs, y, strict=True)) / 2
    kd = 0.0
    for s, t in zip(zs, zt, strict=True):
        ps, pt = _softmax([v / T for v in s]), _softmax([v / T for v in t])
        kd += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True)) / 2
    want = alpha * T * T * kd + (1 - alpha) * ce

    total, ce_t, kd_t = distill_loss(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([y]),
                                     alpha, T)
    assert float(ce_t) == pytest.approx(ce, rel=1e-6)
    assert float(kd_t) == pytest.approx(kd, rel=1e-6)
    assert float(total) == pytest.approx(want, rel=1e-6)
    assert float(kd_loss(torch.tensor(zs), torch.tensor(zs), T)) == pytest.approx(0, abs=1e-7)


def test_distiller_backpropagates_the_weighted_loss():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 5), torch.nn.Linear(4, 5)
    x, y = torch.randn(2, 3, 4), torch.randint(0, 5, (2, 3))
    d = Distiller(teacher, alpha=0.7, temperature=3.0)
    ce, kd = d.forward_backward(student, x, y, scale=0.5)
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    total, ce2, kd2 = distill_loss(student(x), teacher(x).detach(), y, 0.7, 3.0)
    (0.5 * total).backward()
    for g, p in zip(got, student.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)
    assert (ce, kd) == (ce2.detach(), kd2.detach())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_train_step_distils_from_the_frozen_teacher(tmp_path, dataset, source):
    cfg = arm_config(tmp_path, dataset, "bitnet", source, "--distill.alpha=0.5",
                     "--distill.temperature=2", "--train.grad_accum=2")
    tokens = prepare(cfg, progress=False).tokens("train")

    def trainer():
        return build_trainer(cfg, tokens, torch.device("cpu"),
                             model_initialiser(cfg, tokens, "cpu", note=False))

    tr, ref = trainer(), trainer()  # the same seeded model, sampler and teacher twice
    teacher = tr.distiller.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    stats = tr.train_step(0)
    ce = kd = 0.0
    with torch.no_grad():
        for _ in range(2):  # the step's two micro-batches, by hand
            x, y = ref.sampler.next()
            _, c, k = distill_loss(ref.model(x), teacher(x), y, 0.5, 2.0)
            ce, kd = ce + float(c) / 2, kd + float(k) / 2
    assert stats.loss == pytest.approx(ce, rel=1e-5) and stats.kd == pytest.approx(kd, rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert tr.model.layers[0].attn.q_proj.weight.grad is not None


def test_metrics_hold_ce_kd_and_total(tmp_path, dataset, source):
    cfg = arm_config(tmp_path, dataset, "bitnet", source, "--distill.alpha=0.25",
                     "--distill.temperature=2")
    train(cfg)
    recs = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(recs) == 6
    for r in recs:
        assert r["ce"] == r["loss"] and r["kd"] >= 0
        assert r["total"] == pytest.approx(0.25 * 4 * r["kd"] + 0.75 * r["ce"], rel=1e-9)
    teacher, _ = load_trained(source)  # the source is untouched on disk
    assert teacher is not None


def test_distill_config_errors(tmp_path, dataset, source):
    with pytest.raises(HGFError, match="distill.alpha=0.5: needs a teacher"):
        arm_config(tmp_path, dataset, "bitnet", source, "--init.from=", "--distill.alpha=0.5",
                   "--model.vocab_size=320")
    with pytest.raises(HGFError, match="distill.teacher=.* is set but distill.alpha=0"):
        arm_config(tmp_path, dataset, "bitnet", source, f"--distill.teacher={source}")
    with pytest.raises(HGFError, match="must lie in"):
        arm_config(tmp_path, dataset, "bitnet", source, "--distill.alpha=1.5")
    cfg = arm_config(tmp_path, dataset, "bitnet", source, "--distill.alpha=0.5",
                     f"--distill.teacher={tmp_path / 'nowhere'}")
    with pytest.raises(HGFError, match=r"distill.teacher=.*nowhere: not a run"):
        train(cfg)


@pytest.mark.dist
def test_ddp_distillation_equals_one_process(tmp_path, dataset, source):
    from test_dist import metrics, spawn

    over = ("--distill.alpha=0.5", "--distill.temperature=2", "--hgf.rank=2", "--hgf.init=svd",
            "--train.steps=3")
    one = arm_config(tmp_path / "one", dataset, "hgf_std", source, *over)
    prepare(one, progress=False)  # the workers only read the cache
    two = arm_config(tmp_path / "two", dataset, "hgf_std", source, *over,
                     "--train.batch_size=2", "--dist.strategy=ddp")
    train(one)
    spawn([two])
    a, b = metrics(tmp_path / "one", "train"), metrics(tmp_path / "two", "train")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:  # KD is ~1e-4 here: float32 summation order moves it by ~1e-8 absolute
        for key in ("ce", "kd", "total", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
