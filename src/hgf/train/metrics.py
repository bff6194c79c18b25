"""Observability: the JSONL metrics log, optional TensorBoard, and the progress bar.

``RUN_DIR/metrics.jsonl`` holds one JSON object per line, each with ``kind`` and ``step`` (the
number of optimizer updates done):
    {"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", "gates": {...}}
    {"kind": "eval",  "step", "val_loss", "val_ppl", "val_bpb", "val_tokens",
     "zero_frac": {...}, "flip_rate", "gates": {...}}
    {"kind": "final", "step", ...the full-validation metrics...}
Nested dicts are flattened to ``a/b`` tags for TensorBoard.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

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


class Progress:
    """A tqdm bar over the steps with loss and tokens/s (tqdm shows the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        tty = sys.stderr.isatty()  # in a log file, one line every 30 s instead of every 0.1 s
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                        dynamic_ncols=True, desc="train", mininterval=0.1 if tty else 30.0)

    def update(self, loss: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()
