"""Which parameters get weight decay, which form the gate group (docs/METHOD.md §3 gate schedule)."""

from __future__ import annotations

from typing import Any

from torch import nn

from hgf.config import Config
from hgf.model.roles import param_roles

# optimizer kind of each parameter role (hgf.model.roles): projection weights (latent ternary or
# dense) and an untied LM head are decayed; norms, λ vectors and embeddings are not
KIND_OF_ROLE = {"gate": "gate", "correction": "correction", "ternary": "decay", "dense": "decay",
                "head": "decay", "embedding": "no_decay", "other": "no_decay",
                "bias": "no_decay"}  # Tequila's λ (when learned; a frozen one joins no group)


def param_kind(model: nn.Module) -> dict[str, str]:
    """Map every parameter name to ``gate`` | ``correction`` | ``decay`` | ``no_decay``.

    Gates form their own group (LR multiplier, no weight decay); norms, λ vectors and embeddings
    get no weight decay; projection weights (latent ternary or dense) and an untied LM head are
    decayed; the correction A/B follow ``hgf.lr_mult`` and ``hgf.decay``.
    """
    return {f"{mod_name}.{p_name}" if mod_name else p_name: KIND_OF_ROLE[role]
            for mod_name, _, p_name, _, role in param_roles(model, dedup=False)}


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: ``decay``, ``no_decay``, ``gate`` and ``correction`` (each tagged with
    ``name``, its ``lr_mult`` so an LR schedule can scale it, and ``decays`` when the schedule's
    weight decay applies). Tied weights appear once. With the default ``hgf.lr_mult = 1`` and
    ``hgf.decay = true`` the correction A/B join the ``decay`` group, so the group layout (and
    checkpoints) are those of a model without the options."""
    kinds = param_kind(model)
    params = dict(model.named_parameters())  # deduplicates tied parameters
    h, wd = cfg.hgf, cfg.train.weight_decay
    if h.lr_mult == 1.0 and h.decay:
        kinds = {n: "decay" if k == "correction" else k for n, k in kinds.items()}
    groups: dict[str, dict[str, Any]] = {
        "decay": {"weight_decay": wd, "lr_mult": 1.0, "decays": True},
        "no_decay": {"weight_decay": 0.0, "lr_mult": 1.0, "decays": False},
        "gate": {"weight_decay": 0.0, "lr_mult": h.gate_lr_mult, "decays": False},
        "correction": {"weight_decay": wd if h.decay else 0.0, "lr_mult": h.lr_mult,
                       "decays": h.decay},
    }
    out = []
    for name, g in groups.items():
        ps = [p for n, p in params.items() if kinds[n] == name and p.requires_grad]
        if ps:
            out.append({"name": name, "params": ps, **g})
    return out
