"""``hgf convert SRC --to ptqtp OUT``: a full-precision model -> an hgf run of trit-plane projections.

Every block projection (q/k/v/o, gate/up/down) of a dense source is fitted by two ternary planes
with row scales (hgf.model.ptqtp, no training, no data); embeddings, norms, λ vectors and the head
are copied. The run's config is the source's with ``model.linear = ptqtp``, ``model.subln`` pinned
to what the source had (a dense model has no SubLN, and the conversion adds none) and the
``[ptqtp]`` section that made it (``--ptqtp.iterations``, ``--ptqtp.tol``,
``--ptqtp.activations`` on the command line). Besides config.json, model.safetensors and the
tokenizer, the run holds ``ptqtp_fit.json``: per projection the relative error ‖W − Ŵ‖²/‖W‖²
of the fit and of BitNet's per-tensor absmean ternarization of the same W, and the rounds used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hgf.config import Config, build_config, parse_overrides, subln_enabled
from hgf.errors import HGFError
from hgf.model.ptqtp import PTQTPLinear, fit_trit_planes
from hgf.model.quant import ternarize
from hgf.model.transformer import Transformer, build_model

FIT_FILE = "ptqtp_fit.json"


def ptqtp_config(cfg: Config, overrides: list[str] | None = None, src: str = "source") -> Config:
    """The converted run's config; ``overrides`` may set ``ptqtp.*`` keys only."""
    if cfg.model.linear != "dense":
        raise HGFError(f"{src}: PTQTP converts a full-precision model (model.linear=dense); this "
                       f"one has model.linear={cfg.model.linear}")
    over = parse_overrides(list(overrides or []))
    other = sorted(f"{sec}.{k}" for sec, body in over.items() if sec != "ptqtp" for k in body)
    if other:
        raise HGFError(f"--to ptqtp takes only --ptqtp.* options (iterations, tol, activations), "
                       f"got --{other[0]}")
    conv = {"model": {"linear": "ptqtp", "subln": "on" if subln_enabled(cfg.model) else "off"}}
    return build_config((cfg.to_dict(), f"{src} (config)"), (conv, "--to ptqtp"),
                        (over, "command line"))


def _relative(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w - w_hat).double().square().sum() / w.double().square().sum().clamp(min=1e-30))


@torch.no_grad()
def convert_model(model: Transformer, cfg: Config, overrides: list[str] | None = None,
                  src: str = "source") -> tuple[Transformer, Config, dict[str, Any]]:
    """(converted model, its config, fit report) of a dense ``model``."""
    new_cfg = ptqtp_config(cfg, overrides, src)
    p = new_cfg.ptqtp
    new = build_model(new_cfg)
    source = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, mod in new.named_modules():
        if not isinstance(mod, PTQTPLinear):
            continue
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear) or tuple(old.weight.shape) != (mod.out_features,
                                                                         mod.in_features):
            raise HGFError(f"{src}: {name} is not a dense [{mod.out_features}, {mod.in_features}] "
                           "projection")
        w = old.weight.detach().float().cpu()
        fit = fit_trit_planes(w, p.iterations, p.tol)
        state[f"{name}.planes"], state[f"{name}.alpha"] = fit.planes, fit.alpha
        w_t, s_w = ternarize(w)
        layers[name] = {"shape": list(w.shape), "rounds": fit.rounds,
                        "rel_error": _relative(w, fit.dense()),
                        "rel_error_init": fit.errors[0] / max(float(w.double().square().sum()), 1e-30),
                        "rel_error_absmean": _relative(w, w_t / s_w)}
        source.pop(f"{name}.weight")
    for key, t in source.items():
        if key not in new.state_dict():
            raise HGFError(f"{src}: tensor {key} has no place in the ptqtp model")
        state[key] = t
    new.load_state_dict(state, strict=True)
    if new_cfg.model.tie_embeddings:
        new.lm_head.weight = new.tok_emb.weight
    n = max(len(layers), 1)
    info = {"iterations": p.iterations, "tol": p.tol, "activations": p.activations,
            "projections": len(layers),
            "mean_rel_error": sum(v["rel_error"] for v in layers.values()) / n,
            "mean_rel_error_absmean": sum(v["rel_error_absmean"] for v in layers.values()) / n,
            "mean_rounds": sum(v["rounds"] for v in layers.values()) / n,
            "max_rounds": max((v["rounds"] for v in layers.values()), default=0),
            "layers": layers}
    return new.eval(), new_cfg, info


def write_ptqtp(model: Transformer, cfg: Config, out: str | Path, tokenizer: Path | None,
                overrides: list[str] | None = None, src: str = "source") -> dict[str, Any]:
    """Convert and write the run (atomically, as every ``hgf convert`` target)."""
    from hgf.data.tokenizer import tokenizer_metadata
    from hgf.hf.convert import output_dir
    from hgf.runs import MODEL_FILE, TOKENIZER_FILE, atomic_write_text, save_config, save_weights

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before minutes of fitting
        raise HGFError(f"{out}: output already exists and is not an empty folder")
    new, new_cfg, info = convert_model(model, cfg, overrides, src)
    with output_dir(out) as tmp:
        save_config(new_cfg, tmp)
        save_weights(new, tmp / MODEL_FILE, metadata=tokenizer_metadata(tokenizer))
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer.read_bytes())
        atomic_write_text(tmp / FIT_FILE, json.dumps(info, indent=2) + "\n")
    return {"ptqtp": {k: v for k, v in info.items() if k != "layers"}}
