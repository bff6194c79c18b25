"""Which parameters get weight decay, which form the gate group (METHOD.md §3 gate schedule)."""

from __future__ import annotations

from typing import Any

from torch import nn

from hgf.config import Config
from hgf.model.hgf_linear import HGFLinear
from hgf.model.quant import BitLinear


def param_kind(model: nn.Module) -> dict[str, str]:
    """Map every parameter name to ``gate`` | ``decay`` | ``no_decay``.

    Gates form their own group (LR multiplier, no weight decay); norms, λ vectors and embeddings
    get no weight decay; projection weights (latent ternary or dense), the correction A/B and an
    untied LM head are decayed.
    """
    kinds: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, HGFLinear) and p_name == "gate":
                kinds[full] = "gate"
            elif isinstance(mod, (nn.Linear, BitLinear)) and p_name in ("weight", "A", "B"):
                kinds[full] = "decay"
            else:
                kinds[full] = "no_decay"
    return kinds


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: ``decay``, ``no_decay`` and ``gate`` (each tagged with ``name`` and its
    ``lr_mult`` so an LR schedule can scale it). Tied weights appear once."""
    kinds = param_kind(model)
    params = dict(model.named_parameters())  # deduplicates tied parameters
    groups: dict[str, dict[str, Any]] = {
        "decay": {"weight_decay": cfg.train.weight_decay, "lr_mult": 1.0},
        "no_decay": {"weight_decay": 0.0, "lr_mult": 1.0},
        "gate": {"weight_decay": 0.0, "lr_mult": cfg.hgf.gate_lr_mult},
    }
    out = []
    for name, g in groups.items():
        ps = [p for n, p in params.items() if kinds[n] == name and p.requires_grad]
        if ps:
            out.append({"name": name, "params": ps, **g})
    return out
