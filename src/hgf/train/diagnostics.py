"""Ternary-training diagnostics (what no other ternary trainer ships).

For every ternary projection (BitLinear, HGFLinear) with ternary weights W_t = ternarize(W):
    zero fraction   mean(W_t == 0)                         per projection
    flip rate       mean(W_t ≠ W_t at the previous call)   over all ternary weights together
and every HGF gate value g. The previous ternary snapshot (int8) is state to checkpoint, so the
flip rate right after a resume compares against the same snapshot as the uninterrupted run.
Under FSDP2 the whole W is gathered first, so every rank must call this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hgf.model import BitLinear, gate_ranges, gate_values
from hgf.model.roles import modules_with_role
from hgf.parallel import full_tensor


def ternary_layers(model: nn.Module) -> dict[str, BitLinear]:
    return dict(modules_with_role(model, "ternary"))


class TernaryDiagnostics:
    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}  # name -> int8 ternary snapshot

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """``{"zero_frac": {name: f}, "flip_rate": f | None, "gates": {name: g}}``."""
        zero, current = {}, {}
        flips, total = 0, 0
        for name, m in ternary_layers(model).items():
            w_t = m.ternary(full_tensor(m.weight))[0].to(torch.int8)  # whole W, the layer's rule
            zero[name] = float((w_t == 0).float().mean())
            w_t = w_t.cpu()  # the previous eval's codes are kept on the CPU
            prev = self.previous.get(name)
            if prev is not None and prev.shape == w_t.shape:
                flips += int((prev != w_t).sum())
                total += w_t.numel()
            current[name] = w_t
        out: dict[str, Any] = {"zero_frac": zero, "flip_rate": flips / total if total else None}
        self.previous = current
        gates = gate_values(model)
        if gates:
            out["gates"] = gates
        ranges = gate_ranges(model)  # {min, max} of channel and input gates
        if ranges:
            out["gate_range"] = ranges
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.previous)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.previous = dict(state)
