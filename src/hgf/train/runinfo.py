"""``RUN_DIR/run_info.json``: what is needed to reproduce a run besides its config (docs/STYLE.md §12):
git commit (and whether the tree was dirty), versions, hardware, seed, number of processes,
command line; a resumed run appends one entry per restart under ``restarts``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hgf
from hgf.config import Config
from hgf.parallel import world
from hgf.runs import atomic_write_text

RUN_INFO_FILE = "run_info.json"


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the source tree hgf was imported from (None outside git)."""
    src = Path(hgf.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if commit else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    hw: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "device": str(device),
                          "platform": platform.platform()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["gpu_count"] = torch.cuda.device_count()
    return hw


def collect(cfg: Config, device: torch.device) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": _command(),
        "seed": cfg.train.seed,
        "world_size": world().world_size,  # processes (dist.strategy is in the config)
        "git": git_state(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "hgf": hgf.__version__, "numpy": np.__version__,
                     "cuda": torch.version.cuda},
        "hardware": hardware(device),
    }


def write_run_info(run_dir: str | Path, cfg: Config, device: torch.device,
                   resumed_from: int | None) -> None:
    path = Path(run_dir) / RUN_INFO_FILE
    info = collect(cfg, device)
    if resumed_from is not None and path.is_file():
        first = json.loads(path.read_text(encoding="utf-8"))
        first.setdefault("restarts", []).append({"step": resumed_from, **info})
        info = first
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def _command() -> list[str]:
    """``sys.argv`` with the program as a bare name (``hgf``), never a machine's absolute path."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    return ["hgf" if prog in ("__main__.py", "hgf") else prog, *sys.argv[1:]]
