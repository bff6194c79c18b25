"""Device and precision: ``train.device`` auto picks CUDA when present; ``train.dtype`` auto means
bf16 autocast on CUDA and plain float32 on CPU (master weights always float32)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from hgf.errors import HGFError

Autocast = Callable[[], contextlib.AbstractContextManager]


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``option`` names the setting in error messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise HGFError(f"{option}={name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HGFError(f"{option}={name!r} but no CUDA GPU is available")
    return dev


def autocast_for(device: torch.device, dtype: str) -> Autocast:
    """A factory of the forward's autocast context (bf16 on CUDA for ``auto``)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
