"""The HGF gate schedule (docs/METHOD.md §3), applied by the trainer each step.

With S = the schedule's length (train.schedule_steps, 0 = train.steps) and the foundation helpers
of :mod:`hgf.model.hgf_linear`:
    warmup   g ≤ clamp(step) = g0 + (1 - g0) · step / (warmup_frac · S)  until the warmup ends
    L2 pull  loss += gate_l2 · Σ_gates (g - gate_target)²                 (when gate_l2 > 0)
    freeze   from step ≥ freeze_frac · S the gate group's LR is 0, so AdamW leaves every gate
             bitwise unchanged
Past S the clamp is off and frozen gates stay frozen. The gate group's LR otherwise follows the
main schedule × hgf.gate_lr_mult (see schedule.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from hgf.config import Config
from hgf.model import gate_clamp_at, gate_l2_penalty, gates_frozen_at, set_gate_max


class GateSchedule:
    def __init__(self, cfg: Config) -> None:
        self.h = cfg.hgf
        self.steps = cfg.train.schedule_length

    def clamp_at(self, step: int) -> float:
        return gate_clamp_at(step, self.steps, self.h.gate_init, self.h.gate_warmup_frac)

    def frozen_at(self, step: int) -> bool:
        return gates_frozen_at(step, self.steps, self.h.gate_freeze_frac)

    def apply(self, model: nn.Module, optimizer: Optimizer, step: int) -> None:
        """Set the gate clamp for ``step``; zero the gate group's LR once frozen. Call after the
        LR schedule has set this step's learning rates."""
        set_gate_max(model, self.clamp_at(step))
        if self.frozen_at(step):
            for group in optimizer.param_groups:
                if group.get("name") == "gate":
                    group["lr"] = 0.0

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``gate_l2 · Σ (g - target)²`` or None (no gates or gate_l2 = 0)."""
        if self.h.gate_l2 == 0:
            return None
        p = gate_l2_penalty(model, self.h.gate_target)
        return None if p is None else self.h.gate_l2 * p
