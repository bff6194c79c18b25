"""What keeps a run's work safe from outside: SIGINT/SIGTERM during the step loop, and a warning
before the first step when the batch will not fit in memory.

Signals: :class:`StopSignal` catches the first SIGINT or SIGTERM and only records it; the loop
then writes a checkpoint at the next step boundary and raises :class:`TrainingInterrupted`
(``hgf train`` prints its one line and exits 128 + the signal number: 130, 143). The handlers
are the previous ones again from then on, so a second signal interrupts at once (a checkpoint is
written atomically: an interrupted save leaves the older ones). Under torchrun every rank catches
it; the ranks agree (any rank stopping stops all) before the collective save.

Memory: :func:`training_memory` is ``hgf plan``'s peak estimate (hgf.plan) for this config's
micro-batch on this device; :func:`memory_warning` compares it with the memory available now
(CUDA: free device memory; CPU: ``MemAvailable`` of /proc/meminfo, or the cgroup's limit when that
is lower, times the processes sharing the machine).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from hgf.config import Config
from hgf.errors import HGFError

GIB = 1024**3
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(HGFError):
    """A signal stopped the run after a checkpoint was written; ``signum`` is the signal."""

    def __init__(self, msg: str, signum: int) -> None:
        super().__init__(msg)
        self.signum = signum


class StopSignal:
    """Between ``install()`` and ``restore()`` (or as a context manager), records the first SIGINT
    or SIGTERM in ``signum`` instead of dying. Only in the main thread, where Python delivers
    signals; elsewhere it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.restore()  # a second signal acts as it did before

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._old.clear()

    def __enter__(self) -> StopSignal:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ---------------------------------------------------------------------------------------------
# Memory


def meminfo_available(text: str) -> int | None:
    """``MemAvailable`` in bytes from the text of /proc/meminfo."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            value, *unit = line.split(":", 1)[1].split()
            return int(value) * (1024 if unit and unit[0].lower() == "kb" else 1)
    return None


def _cgroup_free() -> int | None:
    """Bytes left under this cgroup's (v2) memory limit, None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes available for training now, where that number comes from), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        avail = meminfo_available(Path("/proc/meminfo").read_text())
    except OSError:
        avail = None
    cgroup = _cgroup_free()
    if cgroup is not None and (avail is None or cgroup < avail):
        return cgroup, "under the cgroup memory limit"
    return (avail, "MemAvailable") if avail is not None else None


def training_memory(cfg: Config, device: torch.device) -> int | None:
    """Peak bytes one process needs (``hgf plan``'s estimate); None if it cannot be made."""
    from hgf.parallel import world
    from hgf.plan import make_plan

    t, d = cfg.train, cfg.dist
    autocast = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    # on CPU differential attention runs the math kernel (T×T softmax saved), see hgf.plan
    kernel = "math" if device.type == "cpu" and cfg.model.attention == "differential" else "fused"
    strategy = d.strategy if d.strategy in ("ddp", "fsdp2") else "single"
    try:
        plan = make_plan(cfg, max(world().world_size, 1), 1, t.batch_size, t.seq_len,
                         autocast=autocast, attention_kernel=kernel)
    except (HGFError, RuntimeError, ValueError):  # an estimate never stops a run
        return None
    return int(plan.memory[strategy].peak(d.activation_checkpointing))


def memory_warning(cfg: Config, device: torch.device) -> str | None:
    """One line when the estimated peak exceeds the memory available now, else None."""
    need = training_memory(cfg, device)
    avail = available_memory(device)
    if need is None or avail is None:
        return None
    if device.type == "cpu":  # the processes of this machine share its memory
        need *= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free, source = avail
    if need <= free:
        return None
    t = cfg.train
    return (f"training needs about {need / GIB:.2f} GiB (hgf plan's estimate for micro-batches of "
            f"{t.batch_size} x {t.seq_len} tokens) but only {free / GIB:.2f} GiB is available "
            f"({source}); it may be killed for lack of memory: lower train.batch_size (raise "
            "train.grad_accum to keep the batch) or train.seq_len, or set "
            "dist.activation_checkpointing=true")
