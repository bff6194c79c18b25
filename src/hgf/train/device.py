"""Device and precision: ``train.device`` auto picks CUDA when present (hgf.device);
``train.dtype`` auto means bf16 autocast on CUDA and plain float32 on CPU (master weights always
float32)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from hgf.device import resolve_device

__all__ = ["Autocast", "autocast_for", "resolve_device"]
Autocast = Callable[[], contextlib.AbstractContextManager]


def autocast_for(device: torch.device, dtype: str) -> Autocast:
    """A factory of the forward's autocast context (bf16 on CUDA for ``auto``)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
