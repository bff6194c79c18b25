"""Learning-rate and weight-decay schedules, as pure functions of the update index.

``step`` is the 0-based index of the optimizer update about to run; ``S`` = the schedule's length
(train.schedule_steps, 0 = train.steps), ``W`` = train.warmup_steps, ``lr`` the peak LR,
``f`` = train.min_lr_frac.

    warmup (all schedules)   lr_t = lr · (step + 1) / W                         for step < W
    cosine                   lr_t = lr·f + lr·(1 - f) · ½(1 + cos(π · p)),   p = (step - W) / (S - W)
    constant                 lr_t = lr
    two_stage (BitNet b1.58) lr_t = lr for step < S/2, then lr · two_stage_lr_frac (constant);
                             weight decay is train.weight_decay, then 0 from S/2 on
                             (docs/METHOD.md §6: 1.5e-3 -> 1e-3 and WD 0.1 -> 0 halfway through)
    past the schedule        for step >= S every schedule holds its final value: cosine lr·f,
                             two_stage lr · two_stage_lr_frac with WD 0, constant lr (a finished
                             run extended to more train.steps keeps S = its old length)

Each optimizer group gets ``lr_t × group["lr_mult"]``; only groups tagged ``decays`` get the
weight decay (``decay``, and ``correction`` unless hgf.decay is false).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from hgf.config import TrainConfig


class Schedule:
    def __init__(self, t: TrainConfig) -> None:
        self.t = t

    @property
    def steps(self) -> int:
        return self.t.schedule_length

    @property
    def halfway(self) -> int:
        return self.steps // 2

    @property
    def final_lr(self) -> float:
        """The LR every step past the schedule's end holds."""
        t = self.t
        return {"constant": t.lr, "two_stage": t.lr * t.two_stage_lr_frac}.get(
            t.schedule, t.lr * t.min_lr_frac)

    def lr_at(self, step: int) -> float:
        t = self.t
        if step >= self.steps:
            return self.final_lr
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return t.lr
        if t.schedule == "two_stage":
            return t.lr if step < self.halfway else t.lr * t.two_stage_lr_frac
        p = min(1.0, (step - t.warmup_steps) / max(1, self.steps - t.warmup_steps))
        return t.lr * (t.min_lr_frac + (1 - t.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    def wd_at(self, step: int) -> float:
        if self.t.schedule == "two_stage" and step >= self.halfway:
            return 0.0
        return self.t.weight_decay

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set every group's LR (× its ``lr_mult``) and the decayed groups' WD; return the base LR."""
        lr, wd = self.lr_at(step), self.wd_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            if group.get("decays", group.get("name") == "decay"):
                group["weight_decay"] = wd
        return lr
