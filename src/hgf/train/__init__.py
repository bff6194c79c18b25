"""The training engine, built from small parts: schedule, gate schedule, optimizer, batches,
evaluator, diagnostics, metrics logger, checkpointer, and the loop that ties them together."""

from hgf.train.evaluate import EvalResult, evaluate
from hgf.train.loop import (
    RunResult,
    Trainer,
    build_trainer,
    forward_backward_step,
    resolve_device,
    train,
)

__all__ = ["EvalResult", "RunResult", "Trainer", "build_trainer", "evaluate",
           "forward_backward_step", "resolve_device", "train"]
