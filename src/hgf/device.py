"""The device a setting names: ``auto`` picks CUDA when present (``train.device``, ``--device``)."""

from __future__ import annotations

import torch

from hgf.errors import HGFError


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
