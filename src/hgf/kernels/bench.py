"""GEMV micro-benchmark: dense float32 / bf16 ``F.linear`` against packed ternary_linear.

For each size n, one token ``x [1, n]`` times a weight ``[n, n]``; the median time of each
method, the effective bandwidth of the weight bytes it reads (packed bytes for i2/tq1/sherry,
dense bytes for float32/bf16) and the speed-ups over dense float32 and over ternary i2 (the
same ISA), all measured in one process. The sherry rows multiply a 3:4 sparse ternary weight
(1.25 bits/weight; sizes not a multiple of 4 have no sherry row).

Caches: with ``rotate=True`` (default) every method cycles through enough copies of its weight to
exceed twice the last-level cache (CPU L3 / GPU L2), so each call streams its weight from DRAM
as in a real decode step (all layers together never fit in cache); ``rotate=False`` reuses one
weight (cache-hot, the best case for small packed weights). ``read_bandwidth`` (one read of a
large buffer, like a GEMV's weights) is the practical peak the "% read" column compares with;
``copy_bandwidth`` (a large copy, read + write bytes) is reported beside it. ``isas`` (CPU)
times the packed methods once per forced C++ kernel ISA (``hgf.kernels.cpu.isa``, capped at
what the CPU has; the "impl" column names it), e.g. the AVX2 and portable paths on an AVX-512
machine.

    python -m hgf.kernels.bench --device cpu --sizes 2048 4096
    python -m hgf.kernels.bench --threads 1 --isa avx512-vnni avx2 portable
    python -m hgf.kernels.bench --device cuda --sizes 4096 8192 --json gemv.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hgf.kernels import cpu
from hgf.kernels.ops import kernel_for, ternary_linear
from hgf.kernels.packing import PACKING_REGISTRY, PACKINGS, pack_ternary
from hgf.model.sherry import sherry_ternarize

DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(fn: Callable[[int], object], device: torch.device, iters: int = 100,
               warmup: int = 10) -> list[float]:
    """Wall times of ``fn(i)`` in microseconds, one per call (GPU: synchronised per call)."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(warmup + i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def time_us(fn: Callable[[int], object], device: torch.device, iters: int = 100,
            warmup: int = 10) -> float:
    """Median wall time of ``fn(i)`` in microseconds."""
    return statistics.median(wall_times(fn, device, iters, warmup))


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size (CPU L3 from sysfs, GPU L2); 64 MiB if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip().upper()
        mult = {"K": 1024, "M": 1024**2}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 64 * 1024**2


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int = 256 * 1024**2,
                   iters: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on a large buffer, counting bytes read + written."""
    device = torch.device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_us(lambda i: dst.copy_(src), device, iters=iters, warmup=2)
    return 2 * nbytes / t / 1e3


def read_bandwidth(device: str | torch.device = "cpu", nbytes: int = 256 * 1024**2,
                   chunk: int = 4 * 1024**2, iters: int = 64) -> float:
    """GB/s of reading a large buffer once, ``chunk`` bytes per timed call (like one GEMV's
    weights; the median of short calls is robust to a busy machine's preemptions). CPU: the C++
    kernel's prefetching byte sum ``hgf::stream_read``; GPU or no C++ kernel: ``.sum()``."""
    device = torch.device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    chunk = min(chunk, nbytes)
    n = nbytes // chunk
    if device.type == "cpu" and kernel_for(src[:1].float(), 1) == "cpu":
        read = torch.ops.hgf.stream_read
    else:
        read = torch.sum
    t = time_us(lambda i: read(src[(i % n) * chunk:(i % n + 1) * chunk]), device, iters=iters,
                warmup=n)
    return chunk / t / 1e3


def _copies(make: Callable[[], torch.Tensor], nbytes: int, budget: int) -> list[torch.Tensor]:
    return [make() for _ in range(max(1, math.ceil(budget / nbytes)))]


Case = tuple[str, int, Callable[[int], object], str]


def _cases(n: int, device: torch.device, dtypes: tuple[str, ...], packings: tuple[str, ...],
           budget: int, gen: torch.Generator) -> list[Case]:
    """(method, weight bytes, fn(i), implementation) for one size; fn(i) uses weight copy i."""
    x32 = torch.randn(1, n, generator=gen).to(device)
    w32 = torch.randn(n, n, generator=gen)
    w_t = torch.randint(-1, 2, (n, n), generator=gen, dtype=torch.int8)
    s_w = torch.tensor(1.5, device=device)
    cases = []
    for name in dtypes:
        dt = DENSE[name]
        ws = _copies(lambda dt=dt: w32.to(device, dt), n * n * dt.itemsize, budget)
        x = x32.to(dt)
        cases.append((name, n * n * dt.itemsize,
                      lambda i, ws=ws, x=x: F.linear(x, ws[i % len(ws)]), "torch"))
    w34 = None  # a 3:4 sparse ternary weight, for the packings that hold only those (sherry)
    for packing in packings:
        if PACKING_REGISTRY[packing].sparsity == "3:4":
            if n % 4:  # groups of 4 weights
                continue
            w34 = sherry_ternarize(w32)[0] if w34 is None else w34
        packed = pack_ternary(w_t if PACKING_REGISTRY[packing].sparsity is None else w34,
                              packing).to(device)
        ps = _copies(packed.clone, packed.numel(), budget)
        cases.append((f"ternary {packing}", packed.numel(),
                      lambda i, ps=ps, pk=packing: ternary_linear(x32, ps[i % len(ps)], s_w, pk,
                                                                  n, n),
                      kernel_for(x32, n, packing)))
    return cases


def gemv_table(
    sizes: tuple[int, ...] = (2048, 4096),
    device: str | torch.device = "cpu",
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    packings: tuple[str, ...] = PACKINGS,
    iters: int = 100,
    rotate: bool = True,
    seed: int = 0,
    isas: tuple[str, ...] = (),
) -> list[dict]:
    """One row per (size, method[, forced ISA]): median and min time (us), weight bytes read,
    GB/s, speed-up vs float32 and vs ternary i2 of the same size and ISA (all from the median;
    ``vs_i2`` = t(i2) / t(method), None without an i2 row)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    budget = 2 * cache_bytes(device) if rotate else 0
    rows, best = [], cpu.isa() if isas else None
    try:
        for n in sizes:
            base = None
            cases = _cases(n, device, dtypes, packings, budget, gen)
            timed = [(c, None) for c in cases if c[3] != "cpu" or not isas]
            timed += [(c, isa) for isa in isas for c in cases if c[3] == "cpu"]
            for (name, nbytes, fn, impl), isa in timed:
                impl = cpu.isa(isa) if isa else impl
                times = wall_times(fn, device, iters=iters)
                t = statistics.median(times)
                base = t if name == "float32" else base
                rows.append({"n": n, "method": name, "impl": impl, "time_us": t,
                             "min_us": min(times),
                             "weight_bytes": nbytes, "gb_s": nbytes / t / 1e3,
                             "speedup_vs_f32": base / t if base else None})
            i2 = {r["impl"]: r["time_us"] for r in rows
                  if r["n"] == n and r["method"] == "ternary i2"}
            for r in rows:
                if r["n"] == n:
                    r["vs_i2"] = (i2[r["impl"]] / r["time_us"]
                                  if r["method"].startswith("ternary") and r["impl"] in i2
                                  else None)
    finally:
        if best:
            cpu.isa(best)
    return rows


def format_table(rows: list[dict], peak_gb_s: float | None = None) -> str:
    """Rows as a text table; "% read" = GB/s over ``peak_gb_s`` (e.g. read_bandwidth())."""
    iw = max([6] + [len(r["impl"]) for r in rows])
    head = f"{'n':>6} {'method':<14} {'impl':<{iw}} {'median us':>10} {'min us':>9} {'MiB read':>9}"
    head += f" {'GB/s':>6} {'% read':>7} {'vs f32':>7} {'vs i2':>6}"
    lines = [head]
    for r in rows:
        pct = f"{100 * r['gb_s'] / peak_gb_s:6.0f}%" if peak_gb_s else f"{'-':>7}"
        sp = f"{r['speedup_vs_f32']:6.2f}x" if r["speedup_vs_f32"] else f"{'-':>7}"
        vi = f"{r['vs_i2']:5.2f}x" if r.get("vs_i2") else f"{'-':>6}"
        lines.append(f"{r['n']:>6} {r['method']:<14} {r['impl']:<{iw}} {r['time_us']:>10.1f} "
                     f"{r['min_us']:>9.1f} {r['weight_bytes'] / 2**20:>9.2f} {r['gb_s']:>6.1f} "
                     f"{pct} {sp} {vi}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "loadavg_1m": os.getloadavg()[0]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cpu" and kernel_for(torch.zeros(1, 8), 8) == "cpu":
        env["cpu_isa"] = cpu.isa()
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hgf.kernels.bench", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--dtypes", nargs="+", default=list(DENSE), choices=list(DENSE))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--hot", action="store_true", help="reuse one weight (cache-hot)")
    ap.add_argument("--isa", nargs="+", default=[], choices=cpu.ISAS,
                    help="time the packed methods under each of these C++ kernel ISAs (CPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.isa and kernel_for(torch.zeros(1, 8, device=device), 8) != "cpu":
        ap.error("--isa needs the C++ CPU kernel (--device cpu, kernel built)")
    read, copy = read_bandwidth(device), copy_bandwidth(device)
    rows = gemv_table(tuple(args.sizes), device, tuple(args.dtypes), iters=args.iters,
                      rotate=not args.hot, isas=tuple(args.isa))
    env = {**environment(device), "read_gb_s": read, "copy_gb_s": copy, "rotate": not args.hot}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in env.items()))
    print(format_table(rows, read))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
