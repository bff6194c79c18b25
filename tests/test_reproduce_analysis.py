"""hgf.reproduce.analysis: how much a trained HGF model uses its correction path."""

import pytest
import torch

from hgf.config import load_config
from hgf.model import build_model
from hgf.model.hgf_linear import HGFLinear
from hgf.reproduce.analysis import correction_use, main
from hgf.runs import save_config, save_weights


def _run(tmp_path, arm, b_scale):
    cfg = load_config(f"configs/{arm}.toml", ["--model.vocab_size=64"])
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HGFLinear):
                m.B.copy_(b_scale * torch.randn_like(m.B))
    run = tmp_path / arm
    save_config(cfg, run)
    save_weights(model, run / "model.safetensors")
    return run, model


def test_share_and_alignment_by_hand(tmp_path):
    run, model = _run(tmp_path, "hgf", 0.0)
    u = correction_use(run)
    assert u["share"] == 0.0 and u["projections"] == 14 and u["residual"] > 0

    run, model = _run(tmp_path / "b", "hgf", 0.3)
    shares = []
    for m in model.modules():
        if isinstance(m, HGFLinear):
            w = m.weight.detach()
            s = 1 / w.abs().mean().clamp_min(1e-5)
            w_q = (w * s).round().clamp(-1, 1) / s
            c = torch.sigmoid(m.gate.detach()) * m.B.detach() @ m.A.detach()
            shares.append(float(torch.linalg.matrix_norm(c) / torch.linalg.matrix_norm(w_q)))
    assert correction_use(run)["share"] == pytest.approx(sum(shares) / len(shares), rel=1e-5)


def test_cli_table_and_error(tmp_path, capsys):
    run, _ = _run(tmp_path, "hgf", 0.1)
    assert main([str(run)]) == 0
    assert f"| {run.name} | 14 |" in capsys.readouterr().out
    plain, _ = _run(tmp_path, "bitnet", 0.0)
    assert main([str(plain)]) == 2
    assert "no HGF projections" in capsys.readouterr().err
