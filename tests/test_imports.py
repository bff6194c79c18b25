"""Every module of hgf imports on its own, first, in a fresh interpreter, and in any order
(no import cycle depends on which module happens to be imported first).

One subprocess loads the third-party libraries once, then forks a child per module that imports
``hgf.<module>`` before anything else of hgf (what ``python -c "import hgf.x"`` does, without
paying for torch each time), and two more children that import every module in sorted and in
reverse order (up to four children at a time).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hgf

SRC = Path(hgf.__file__).resolve().parent.parent


def all_modules() -> list[str]:
    names = []
    for p in sorted((SRC / "hgf").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


CHILDREN = r"""
import importlib, os, sys, traceback
import numpy, safetensors.torch, tokenizers, torch  # the heavy libraries, loaded once
try:
    import transformers.modeling_utils
except ImportError:
    pass
mods = sys.argv[1:]
jobs = [[m] for m in mods] + [mods, mods[::-1]]  # each module first; then all, in two orders
running, failed = {}, []
for job in jobs:
    if len(running) >= min(4, os.cpu_count() or 1):
        pid, status = os.wait()
        if status:
            failed.append(running[pid])
        del running[pid]
    pid = os.fork()
    if pid == 0:  # a fresh interpreter as far as hgf is concerned
        try:
            for m in job:
                importlib.import_module(m)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    running[pid] = job[0] if len(job) == 1 else f"all from {job[0]}"
while running:
    pid, status = os.wait()
    if status:
        failed.append(running[pid])
    del running[pid]
print("FAILED:", ", ".join(failed))
sys.exit(1 if failed else 0)
"""


def _run(script: str, mods: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HGF_NO_CPU_KERNEL": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", script, *mods], capture_output=True, text=True,
                          env=env, timeout=600)


def test_module_list_is_complete():
    mods = all_modules()
    assert "hgf" in mods and "hgf.model.transformer" in mods and len(mods) > 50


def test_every_module_imports_first_and_in_any_order():
    r = _run(CHILDREN, all_modules())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
