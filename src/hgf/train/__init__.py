"""The training engine, built from small parts: schedule, gate schedule, optimizer, batches,
evaluator, diagnostics, metrics logger, checkpointer, and the loop that ties them together."""

from hgf.train.device import autocast_for, resolve_device
from hgf.train.evaluate import EvalResult, evaluate, evaluate_tokens
from hgf.train.guard import TrainingInterrupted
from hgf.train.loop import (
    RunResult,
    Trainer,
    build_trainer,
    forward_backward_step,
    train,
)

__all__ = ["EvalResult", "RunResult", "Trainer", "TrainingInterrupted", "autocast_for",
           "build_trainer", "evaluate", "evaluate_tokens", "forward_backward_step",
           "resolve_device", "train"]
