"""The HGF gate schedule in the training loop: clamp during warmup, bitwise freeze after."""

import pytest
import torch

from hgf.data import prepare
from hgf.model import gate_values, hgf_layers
from hgf.model.hgf_linear import NO_CLAMP
from hgf.train import build_trainer
from trainkit import tiny_config

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, dataset, *over):
    cfg = tiny_config(tmp_path, dataset, "hgf", "--train.steps=10", "--train.lr=1e-2", *over)
    return build_trainer(cfg, prepare(cfg, progress=False).tokens("train"), torch.device("cpu"))


def test_gates_clamped_during_warmup(tmp_path, dataset):
    # a strong L2 pull towards 0.9 drives every gate up, so the warmup clamp must bind
    tr = _trainer(tmp_path, dataset, "--hgf.gate_warmup_frac=0.5", "--hgf.gate_l2=10",
                  "--hgf.gate_target=0.9", "--hgf.gate_lr_mult=10")
    binding = 0
    for step in range(10):
        tr.train_step(step)
        clamp = tr.gates.clamp_at(step)
        g = gate_values(tr.model)
        if step < 5:
            assert clamp == 0.1 + 0.9 * step / 5
            assert all(v <= clamp + 1e-7 for v in g.values()), (step, clamp, g)
            binding += sum(abs(v - clamp) < 1e-7 for v in g.values())
        else:
            assert clamp == NO_CLAMP
    assert binding > 0  # the clamp really limited some gate
    g = gate_values(tr.model)
    for name, m in hgf_layers(tr.model):  # after warmup: the parameterization, unclamped
        assert g[name] == float(torch.sigmoid(m.gate.detach()))


def test_gates_bitwise_frozen_after_freeze_step(tmp_path, dataset):
    tr = _trainer(tmp_path, dataset, "--hgf.gate_freeze_frac=0.5", "--hgf.gate_lr_mult=10")
    gates = [m.gate for _, m in hgf_layers(tr.model)]
    start = [g.detach().clone() for g in gates]
    for step in range(5):
        tr.train_step(step)
    at_freeze = [g.detach().clone() for g in gates]
    assert all(not torch.equal(a, b) for a, b in zip(start, at_freeze, strict=True))  # they did train
    other = tr.model.layers[0].attn.q_proj.A
    other_before = other.detach().clone()
    for step in range(5, 10):
        assert tr.gates.frozen_at(step)
        tr.train_step(step)
        assert all(torch.equal(g, f) for g, f in zip(gates, at_freeze, strict=True)), step
        assert all(g.grad is not None for g in gates)  # still in the graph, just not updated
    assert not torch.equal(other, other_before)  # the rest of the model keeps training
