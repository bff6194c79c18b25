"""Training-speed benchmark of the arms at one size, in one process.

For every arm, one full optimizer update (forward, backward, clip, AdamW, schedules) on random
tokens is timed; the arms run interleaved, one step each per round, so slow drifts of a shared
machine hit every arm alike. The first ``warmup`` rounds are discarded; the reported step time is
the median of the remaining ``steps`` rounds, tokens/s = batch_size · seq_len / step time, and
ratio = step time / step time of the reference arm (fp16). The process CPU time of each step is
reported next to the wall time: on a machine shared with other jobs the wall time includes time
spent waiting for a core, the CPU time (with one thread) does not.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hgf.config import load_config
from hgf.train.device import resolve_device
from hgf.train.loop import build_trainer


@dataclass
class BenchRow:
    arm: str
    params: int
    step_s: float  # median wall-clock step time
    tokens_per_s: float
    ratio: float  # step time / reference arm's
    cpu_s: float  # median process CPU time per step
    cpu_ratio: float


def bench_train(arms: list[str], config_dir: str | Path, size: str, batch_size: int,
                seq_len: int, steps: int, warmup: int, device: str = "auto",
                overrides: list[str] | None = None) -> list[BenchRow]:
    dev = resolve_device(device)
    trainers = {}
    for arm in arms:
        cfg = load_config(Path(config_dir) / f"{arm}.toml",
                          [f"--model.size={size}", f"--train.batch_size={batch_size}",
                           f"--train.seq_len={seq_len}", f"--train.steps={warmup + steps}",
                           f"--train.device={device}", *(overrides or [])])
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 1 << 16)
        trainers[arm] = build_trainer(cfg, tokens.astype(np.int64), dev)
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    for step in range(warmup + steps):
        for arm, tr in trainers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tr.train_step(step)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step >= warmup:
                wall[arm].append(time.perf_counter() - t0)
                cpu[arm].append(time.process_time() - c0)
    med = {arm: statistics.median(ts) for arm, ts in wall.items()}
    med_cpu = {arm: statistics.median(ts) for arm, ts in cpu.items()}
    ref = "fp16" if "fp16" in med else arms[0]
    return [BenchRow(arm, sum(p.numel() for p in trainers[arm].model.parameters()), med[arm],
                     batch_size * seq_len / med[arm], med[arm] / med[ref], med_cpu[arm],
                     med_cpu[arm] / med_cpu[ref]) for arm in arms]


def format_table(rows: list[BenchRow]) -> str:
    lines = ["| arm | params | step time (ms) | tokens/s | × fp16 | CPU time/step (ms) | × fp16 (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.arm} | {r.params / 1e6:.2f}M | {r.step_s * 1e3:.1f} | {r.tokens_per_s:,.0f} | "
              f"{r.ratio:.2f} | {r.cpu_s * 1e3:.1f} | {r.cpu_ratio:.2f} |" for r in rows]
    return "\n".join(lines)


def machine_line(device: str) -> str:
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"device {resolve_device(device)}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load}")
