"""Knowledge distillation from a frozen teacher (``[distill]``: alpha, temperature, teacher).

For one micro-batch with student logits ``z_s`` and teacher logits ``z_t`` (``[b, t, V]``),
targets ``y`` and N = b·t tokens:

    CE    = (1/N) Σ_tokens −log softmax(z_s)[y]
    KD    = (1/N) Σ_tokens KL(p_t ‖ p_s),   p_t = softmax(z_t / T),  p_s = softmax(z_s / T)
          = (1/N) Σ_tokens Σ_v p_t,v (log p_t,v − log p_s,v)
    total = α · T² · KD + (1 − α) · CE          (+ the gate L2 penalty, as without distillation)

all in float32. The T² keeps the soft-target gradients on the scale of CE's as T changes
(Hinton et al., 2015). The teacher (``distill.teacher``, default ``init.from``: a run, an hgf or
Llama Hugging Face folder) is loaded once, frozen (``requires_grad_(False)``) and in eval mode; its
logits are computed for each micro-batch under ``torch.no_grad`` and the training autocast, so no
dataset-wide cache exists. Under DDP/FSDP2 every rank holds a full copy of the teacher (it is not
wrapped: it has no gradients to synchronise) and distils its own slice of the batch.

The trainer logs ``ce``, ``kd`` and ``total`` next to ``loss`` (= ce, comparable with runs
without distillation) in metrics.jsonl, each the mean over the micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hgf.config import Config
from hgf.errors import HGFError
from hgf.model.transformer import lm_loss
from hgf.train.device import Autocast


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(z_t/T) ‖ softmax(z_s/T)), float32."""
    v = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, alpha: float, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kd) of one micro-batch (module docstring)."""
    ce = lm_loss(student_logits, targets)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return alpha * temperature ** 2 * kd + (1 - alpha) * ce, ce, kd


class Distiller:
    """The frozen teacher and the loss weights; :meth:`forward_backward` is the distillation
    counterpart of :func:`hgf.train.loop.forward_backward_step`."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def total(self, ce: float, kd: float) -> float:
        return self.alpha * self.temperature ** 2 * kd + (1 - self.alpha) * ce

    def record(self, ce: float, kd: float) -> dict[str, float]:
        """The metrics.jsonl fields of a step."""
        return {"ce": ce, "kd": kd, "total": self.total(ce, kd)}

    def forward_backward(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, *, scale: float = 1.0,
                         autocast: Autocast = contextlib.nullcontext,
                         penalty: Callable[[], torch.Tensor | None] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backpropagate ``scale · (total + penalty)`` for one micro-batch; return the detached
        (ce, kd)."""
        with torch.no_grad(), autocast():
            teacher_logits = self.teacher(x)
        with autocast():
            logits = model(x)
        total, ce, kd = distill_loss(logits, teacher_logits, y, self.alpha, self.temperature)
        extra = penalty() if penalty is not None else None
        if extra is not None:
            total = total + extra
        (total * scale).backward()
        return ce.detach(), kd.detach()


def build_distiller(cfg: Config, device: torch.device | str) -> Distiller | None:
    """The Distiller of ``cfg`` (None when ``distill.alpha`` = 0) with its teacher on ``device``."""
    d = cfg.distill
    if d.alpha == 0:
        return None
    from hgf.train.init_from import load_source_model

    path = d.teacher or cfg.init.from_
    what = "distill.teacher" if d.teacher else "init.from (the default distill.teacher)"
    teacher, tcfg = load_source_model(path, what)
    if tcfg.model.vocab_size != cfg.model.vocab_size:
        raise HGFError(f"{what}={path}: the teacher's vocabulary ({tcfg.model.vocab_size}) differs "
                       f"from model.vocab_size={cfg.model.vocab_size}")
    if tcfg.model.max_seq_len < cfg.train.seq_len:
        raise HGFError(f"{what}={path}: the teacher's max_seq_len={tcfg.model.max_seq_len} is "
                       f"shorter than train.seq_len={cfg.train.seq_len}")
    return Distiller(teacher.to(device), d.alpha, d.temperature)
