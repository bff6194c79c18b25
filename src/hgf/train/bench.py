"""Training-speed benchmark of the arms at one size, in one process.

For every arm, one full optimizer update (forward, backward, clip, AdamW, schedules) on random
tokens is timed; the arms run interleaved, one step each per round, so slow drifts of a shared
machine hit every arm alike. The first ``warmup`` rounds are discarded; the reported step time is
the median of the remaining ``steps`` rounds, tokens/s = batch_size · seq_len / step time, and
ratio = step time / step time of the reference arm (fp16; with ``--dtypes``, the fp16 arm at the
first dtype listed). The process CPU time of each step is
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
from hgf.errors import HGFError
from hgf.train.device import autocast_for, gemm_context, resolve_device
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


DTYPES = ("float32", "bfloat16", "bfloat16-aten")  # -aten: bf16 without Float32Gemms


def bench_train(arms: list[str], config_dir: str | Path, size: str, batch_size: int,
                seq_len: int, steps: int, warmup: int, device: str = "auto",
                overrides: list[str] | None = None,
                dtypes: list[str] | None = None) -> list[BenchRow]:
    """One row per arm, or per (arm, dtype) as ``arm@dtype`` when ``dtypes`` is given
    (``bfloat16-aten``: bf16 autocast with ATen's own kernels, i.e. without
    :class:`hgf.train.device.Float32Gemms`, to measure what it saves)."""
    dev = resolve_device(device)
    for dt in dtypes or []:
        if dt not in DTYPES:
            raise HGFError(f"unknown dtype {dt!r}: expected one of {', '.join(DTYPES)}")
    trainers = {}
    for arm in arms:
        for dt in dtypes or [None]:
            cfg = load_config(Path(config_dir) / f"{arm}.toml",
                              [f"--model.size={size}", f"--train.batch_size={batch_size}",
                               f"--train.seq_len={seq_len}", f"--train.steps={warmup + steps}",
                               f"--train.device={device}", *(overrides or []),
                               *([f"--train.dtype={dt.removesuffix('-aten')}"] if dt else [])])
            tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 1 << 16)
            tr = build_trainer(cfg, tokens.astype(np.int64), dev)
            if dt == "bfloat16-aten":
                tr.gemms = gemm_context(dev, "bfloat16", float32_gemms=False)
                tr.autocast = autocast_for(dev, "bfloat16", float32_gemms=False)
            trainers[arm if dt is None else f"{arm}@{dt}"] = tr
    names = list(trainers)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for step in range(warmup + steps):
        for name, tr in trainers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tr.train_step(step)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    ref = next((n for n in names if n.split("@")[0] == "fp16"), names[0])
    return [BenchRow(name, sum(p.numel() for p in trainers[name].model.parameters()), med[name],
                     batch_size * seq_len / med[name], med[name] / med[ref], med_cpu[name],
                     med_cpu[name] / med_cpu[ref]) for name in names]


def format_table(rows: list[BenchRow]) -> str:
    ref = next((r.arm for r in rows if r.ratio == 1.0), "fp16")
    lines = [f"| arm | params | step time (ms) | tokens/s | × {ref} | CPU time/step (ms) | × {ref} (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.arm} | {r.params / 1e6:.2f}M | {r.step_s * 1e3:.1f} | {r.tokens_per_s:,.0f} | "
              f"{r.ratio:.2f} | {r.cpu_s * 1e3:.1f} | {r.cpu_ratio:.2f} |" for r in rows]
    return "\n".join(lines)


def machine_line(device: str) -> str:
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"device {resolve_device(device)}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load}")
