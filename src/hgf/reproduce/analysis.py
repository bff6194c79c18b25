"""How much does a trained HGF model use its correction path?

For every HGFLinear of a finished run (its ``model.safetensors``), with the effective ternary
weight ``W_q = W_t / s_w`` and the effective correction ``C = φ(gate) · B A`` (additive fusion):

    share    = ‖C‖_F / ‖W_q‖_F                   size of the correction against the backbone
    residual = ‖W − W_q‖_F / ‖W_q‖_F             quantization residual of the latent weight
    align    = ⟨C, W − W_q⟩ / (‖C‖_F ‖W − W_q‖_F)  does C point along the residual?

Means over the projections are printed per run:

    python -m hgf.reproduce.analysis results/cpu/runs/hgf-2500steps-seed0 ...
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from hgf.errors import HGFError, exit_code
from hgf.model.hgf_linear import HGFLinear
from hgf.model.quant import ternarize
from hgf.runs import load_trained


def correction_use(run_dir: str | Path) -> dict[str, float]:
    """Means of share, residual and align over the HGF projections of a run (see the module
    docstring); raises HGFError for a run without HGF layers."""
    model, _ = load_trained(run_dir)
    rows = []
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, HGFLinear):
                continue
            w = mod.weight.float()
            w_t, s = ternarize(w, mod.weight_eps)
            w_q = w_t / s  # [out, in]
            resid = w - w_q
            g = mod.gate_value()  # [] or [out] (channel); an input gate's value at wᵀt = 0
            g = g[:, None] if g.dim() else g
            c = g * (mod.B.float() @ mod.A.float())  # [out, in]
            if mod.fusion == "convex":
                w_q = (1 - g) * w_q
            rows.append((float(c.norm() / w_q.norm()), float(resid.norm() / w_q.norm()),
                         float((c * resid).sum() / (c.norm() * resid.norm()).clamp_min(1e-12))))
    if not rows:
        raise HGFError(f"{run_dir}: the model has no HGF projections")
    return {k: statistics.fmean(r[i] for r in rows)
            for i, k in enumerate(("share", "residual", "align"))} | {"projections": len(rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hgf.reproduce.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished run directories of HGF models")
    args = p.parse_args(argv)
    print("| run | projections | share ‖C‖/‖W_q‖ | residual ‖W−W_q‖/‖W_q‖ | align cos(C, W−W_q) |")
    print("|---|---|---|---|---|")

    def body() -> int:
        for run in args.runs:
            u = correction_use(run)
            print(f"| {Path(run).name} | {u['projections']} | {u['share']:.4f} | "
                  f"{u['residual']:.3f} | {u['align']:.3f} |")
        return 0

    return exit_code(body)  # a bad run (or an unreadable file): one line, status 2


if __name__ == "__main__":
    raise SystemExit(main())
