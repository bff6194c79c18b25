"""Run a list of grid/sweep specs in sequence, skipping finished runs and resuming interrupted ones.

A run is finished when ``RUN_DIR/done.json`` exists; it records ``ok`` or ``diverged`` (a
non-finite loss or gradient stopped it: for the paper's Diff_Only arm that is a result, not a
failure). An interrupted run has checkpoints but no ``done.json``; the trainer resumes it.
"""

from __future__ import annotations

import json
import time

from hgf.errors import HGFError
from hgf.reproduce.grid import DONE_FILE, RunSpec
from hgf.runs import atomic_write_text


def run_specs(specs: list[RunSpec]) -> None:
    from hgf.train import train
    from hgf.train.loop import NonFiniteError

    n = len(specs)
    for i, spec in enumerate(specs, 1):
        name = f"{spec.variant} ({spec.arm})" if spec.variant else spec.arm
        label = f"[{i}/{n}] {name} {spec.steps} steps seed {spec.seed_index}"
        if spec.lr_candidate is not None:
            label += f" lr {spec.lr_candidate:g}"
        if spec.done:
            print(f"{label}: done already ({spec.dir})", flush=True)
            continue
        print(f"{label} -> {spec.dir}", flush=True)
        t0 = time.time()
        status = {"status": "ok", "message": ""}
        try:
            train(spec.cfg)
        except NonFiniteError as e:
            status = {"status": "diverged", "message": str(e)}
        except HGFError as e:
            if "non-finite" not in str(e):
                raise
            status = {"status": "diverged", "message": str(e)}
        status.update(arm=spec.arm, steps=spec.steps, seed_index=spec.seed_index,
                      lr=spec.cfg.train.lr, wall_s=round(time.time() - t0, 1))
        if spec.variant:
            status["variant"] = spec.variant
        atomic_write_text(spec.dir / DONE_FILE, json.dumps(status, indent=2) + "\n")
        print(f"{label}: {status['status']} in {status['wall_s']:.0f} s", flush=True)
