"""Run a list of grid/sweep specs in sequence, skipping finished runs and resuming interrupted ones.

A run is finished when ``RUN_DIR/done.json`` exists; it records ``ok`` or ``diverged`` (a
non-finite loss or gradient stopped it: for the paper's Diff_Only arm that is a result, not a
failure). An interrupted run has checkpoints but no ``done.json``; the trainer resumes it. A run
another process is training (its folder's lock, :func:`hgf.runs.run_lock`) is skipped, so several
processes can work through one list: each takes the runs nobody holds.

Progress shows whatever ``train.progress`` says (that switch is for ``hgf train``). stdout: a
line when a run starts and one when it ends, with the runs done, the time elapsed and the ETA of
the whole list (the steps per second of this invocation's runs times the steps left), and a line
when the data had to be tokenized; stderr: each run's steps, loss and ETA, as a tqdm bar on a
terminal, else a plain line every ~10 s (``run 3/12 hgf@70: step 40/70 loss 5.1234 2,100 tok/s
ETA 12s | runs 2/12 done, 1m05s elapsed, ETA 4m10s``).
"""

from __future__ import annotations

import json
import math
import sys
import time

from hgf.errors import HGFError
from hgf.reproduce.grid import DONE_FILE, RunSpec
from hgf.runs import RunInUseError, atomic_write_text
from hgf.train.metrics import format_duration, progress_scope


class Clock:
    """Runs done out of the total, time elapsed and ETA of one ``run_specs`` call."""

    def __init__(self, specs: list[RunSpec]) -> None:
        self.t0 = time.monotonic()
        self.total = len(specs)
        self.done = sum(s.done for s in specs)
        self.pending = sum(s.steps for s in specs if not s.done)  # steps of runs not yet started
        self.steps_run = 0  # steps done in this invocation by the runs that have ended

    def start(self, spec: RunSpec) -> None:
        self.pending -= spec.steps

    def end(self, steps_run: int) -> None:
        self.done += 1
        self.steps_run += steps_run

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def status(self, run_done: int = 0, run_left: int = 0) -> str:
        """``runs 2/12 done, 1m05s elapsed, ETA 4m10s``, given the current run's steps done (in
        this process) and left."""
        work = self.steps_run + run_done
        left = self.pending + run_left
        eta = self.elapsed() / work * left if work else math.nan
        text = f"runs {self.done}/{self.total} done, {format_duration(self.elapsed())} elapsed"
        return text + (f", ETA {format_duration(eta)}" if math.isfinite(eta) else "")


def run_label(spec: RunSpec, i: int, n: int, several_seeds: bool) -> str:
    """``run 3/12 hgf@70`` (+ `` seed 1`` when the list holds several seeds, + `` lr 0.002`` in a
    sweep); a variant is named by its variant name."""
    label = f"run {i}/{n} {spec.variant or spec.arm}@{spec.steps}"
    if several_seeds:
        label += f" seed {spec.seed_index}"
    if spec.lr_candidate is not None:
        label += f" lr {spec.lr_candidate:g}"
    return label


def _prepare_data(spec: RunSpec) -> None:
    """Tokenize the run's data now (the trainer finds it cached) to say when and how long: the
    first run of a grid trains the tokenizer, the others share its cache."""
    from hgf.data import prepare

    t0 = time.monotonic()
    data = prepare(spec.cfg, progress=sys.stderr.isatty())
    if data.built:
        print(f"data: tokenizer trained and stories tokenized in "
              f"{format_duration(time.monotonic() - t0)}, cached in {data.dir} for every run",
              flush=True)


def run_specs(specs: list[RunSpec]) -> None:
    from hgf.train import train
    from hgf.train.loop import NonFiniteError

    n = len(specs)
    several_seeds = len({s.seed_index for s in specs}) > 1
    clock = Clock(specs)
    ran = skipped = 0
    for i, spec in enumerate(specs, 1):
        label = run_label(spec, i, n, several_seeds)
        if spec.done:
            print(f"{label}: done already ({spec.dir})", flush=True)
            continue
        print(f"{label} -> {spec.dir} ({clock.status()})", flush=True)
        _prepare_data(spec)
        clock.start(spec)
        t0 = time.time()
        status = {"status": "ok", "message": ""}
        with progress_scope(label, clock.status) as scope:
            try:
                train(spec.cfg)
            except RunInUseError as e:  # another process works through the same grid
                print(f"{label}: skipped, {e}", flush=True)
                skipped += 1
                continue
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
        clock.end(scope.steps_done)
        ran += 1
        print(f"{label}: {status['status']} in {status['wall_s']:.0f} s; {clock.status()}",
              flush=True)
    head = f"{n - skipped} of {n} runs done" if skipped else f"all {n} runs done"
    busy = f", {skipped} skipped: in use by another process" if skipped else ""
    print(f"{head} ({ran} run now, {n - ran - skipped} done already{busy}) in "
          f"{format_duration(clock.elapsed())}", flush=True)
