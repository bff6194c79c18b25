"""Observability: the JSONL metrics log, optional TensorBoard, and the progress of a run.

``RUN_DIR/metrics.jsonl`` holds one JSON object per line, each with ``kind`` and ``step`` (the
number of optimizer updates done):
    {"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "gates": {...}}
        (gates: each projection's gate, the mean of a channel or input gate, whose
        {"min", "max"} go to "gate_range": {...}; eval records too)
    {"kind": "eval",  "step", "val_loss", "val_ppl", "val_bpb", "val_tokens",
     "zero_frac": {...}, "flip_rate", "gates": {...}}
    {"kind": "final", "step", ...the full-validation metrics...}
Nested dicts are flattened to ``a/b`` tags for TensorBoard.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from hgf.errors import HGFError
from hgf.runs import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise HGFError(f"{path}: metrics file not found")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise HGFError(f"{path}:{i}: malformed JSON line") from None
    return out


class MetricsLogger:
    """Appends records to metrics.jsonl (and TensorBoard); a no-op when ``enabled`` is False."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise HGFError("train.tensorboard=true needs the tensorboard package "
                               "(pip install tensorboard)") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int, drop_at_step: tuple[str, ...] = ()) -> None:
        """Drop records past ``step``, and those of the kinds ``drop_at_step`` at ``step`` (a
        resumed run logs them again)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [r for r in read_metrics(self.path.parent) if r.get("step", 0) < step
                or (r.get("step") == step and r.get("kind") not in drop_at_step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        if self.tb is not None:
            self._tb(record, record.get("kind", "train"), int(record.get("step", 0)))

    def _tb(self, d: dict[str, Any], prefix: str, step: int) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                self._tb(v, f"{prefix}/{k}", step)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


PLAIN_EVERY_S = 10.0  # without a terminal: at most one progress line per this many seconds


@dataclass
class ProgressScope:
    """What a job running many trainings (``hgf reproduce``) adds to each run's progress: a label
    for the run (``run 3/12 hgf@70``) and a status of the whole job (runs done, elapsed, ETA),
    given the steps this run has done in this process and the steps it has left. Inside a scope
    the progress shows on the main process whatever ``train.progress`` says."""

    label: str
    status: Callable[[int, int], str] | None = None
    steps_done: int = 0  # steps this run has done in this process (kept up to date by Progress)


_SCOPE: ContextVar[ProgressScope | None] = ContextVar("hgf_progress_scope", default=None)


@contextmanager
def progress_scope(label: str, status: Callable[[int, int], str] | None = None
                   ) -> Iterator[ProgressScope]:
    """Label the progress of the trainings run inside the ``with`` block (see ProgressScope)."""
    scope = ProgressScope(label, status)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def format_duration(seconds: float) -> str:
    """``42s``, ``4m05s``, ``1h02m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one run over its steps. On a terminal: a tqdm bar (steps, loss, tokens/s, ETA).
    Otherwise (a log file, a pipe): a plain line at most every PLAIN_EVERY_S seconds, e.g.
    ``run 3/12 hgf@70: step 40/70 loss 5.1234 2,100 tok/s ETA 12s | runs 2/12 done, ...``."""

    def __init__(self, total: int, initial: int, enabled: bool, stream: TextIO | None = None) -> None:
        from hgf.parallel import is_main_process

        self.scope = _SCOPE.get()
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled or (self.scope is not None and is_main_process())
        self.label = self.scope.label if self.scope is not None else "train"
        self.total, self.initial, self.n = total, initial, initial
        self.tty = self.enabled and _isatty(self.stream)
        self.t0 = self.last_line = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, disable=not self.tty, unit="step",
                        dynamic_ncols=True, desc=self.label, file=self.stream, mininterval=0.1)

    def eta(self) -> float:
        """Seconds left at this run's rate in this process (NaN before the first step)."""
        done = self.n - self.initial
        return (time.monotonic() - self.t0) / done * (self.total - self.n) if done else math.nan

    def _status(self) -> str:
        if self.scope is None or self.scope.status is None:
            return ""
        return self.scope.status(self.n - self.initial, self.total - self.n)

    def line(self, loss: float, tokens_per_s: float) -> str:
        status = self._status()
        return (f"{self.label}: step {self.n}/{self.total} loss {loss:.4f} "
                f"{tokens_per_s:,.0f} tok/s ETA {format_duration(self.eta())}"
                + (f" | {status}" if status else ""))

    def update(self, loss: float, tokens_per_s: float) -> None:
        self.n += 1
        if self.scope is not None:
            self.scope.steps_done = self.n - self.initial
        if not self.enabled:
            return
        if self.tty:
            status = self._status()
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s"
                                     + (f" | {status}" if status else ""), refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            print(self.line(loss, tokens_per_s), file=self.stream, flush=True)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()
