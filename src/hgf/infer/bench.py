"""Inference benchmark: GEMV kernels, then decode speed and memory of a ~100M-parameter model,
packed ternary HGF against the same architecture with dense float32 / bfloat16 projections.

Decode is bandwidth bound: tokens/s ≤ bandwidth / bytes read per token, and the packed model reads
2 (i2) or 1.6 (tq1) bits per ternary weight instead of 32 or 16. Every variant runs the same
greedy loop (hgf.infer.generate_ids: prefill of a random prompt, then KV-cached decode of N
tokens, never stopping early). Decode tokens/s = 1 / median time between consecutive tokens
(robust to the preemptions of a shared machine; the mean, (N-1) / total, is shown beside it), the
median of several rounds in which every variant decodes once, so that a change of machine load
hits every variant alike. Memory: the bytes of the model's parameters and buffers (exact),
the process RSS growth while loading and warming up (CPU), the growth of
torch.cuda.max_memory_allocated (CUDA).

The models have random weights (speed does not depend on the values); the packed one is exported
from an HGF training model through the real file format and loaded with load_packed.

    python -m hgf.infer.bench --device cpu --tokens 64
    hgf bench infer --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from hgf.config import Config, config_from_dict
from hgf.infer.export import export_model
from hgf.infer.format import read_header
from hgf.infer.generate import generate_ids, resolve_device
from hgf.infer.packed import PackedTernaryLinear, load_packed
from hgf.kernels import PACKINGS
from hgf.kernels.bench import (
    copy_bandwidth,
    environment,
    format_table,
    gemv_table,
    read_bandwidth,
)
from hgf.model.transformer import build_model

DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIB = 2**20


def bench_config(size: str, linear: str, rank: int = 8) -> Config:
    """The benchmark architecture: differential attention, SubLN on for every variant, so the
    variants differ only in their projections."""
    return config_from_dict({"model": {"size": size, "linear": linear, "attention": "differential",
                                       "subln": "on"}, "hgf": {"rank": rank}}, "hgf bench infer")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def rss_bytes() -> int:
    """Resident set size of this process (Linux), 0 where unknown. Memory freed earlier is first
    handed back to the OS (glibc ``malloc_trim``), so a new model cannot hide in it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _prompt(model: nn.Module, prompt_len: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.model.vocab_size, (prompt_len,), generator=g).tolist()


def decode_speed(model: nn.Module, prompt: list[int], tokens: int) -> dict:
    """Greedy prefill + decode timing of ``tokens`` new tokens after ``prompt``: tokens/s from
    the mean and from the median time between consecutive tokens (the median is robust to the
    preemptions of a busy machine)."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    generate_ids(model, prompt, max_new_tokens=tokens, on_token=lambda _: stamps.append(
        time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # noqa: B905 (lengths differ by design)
    return {"prefill_ms": 1e3 * (stamps[0] - t0), "tokens": len(stamps),
            "decode_tok_s": 1 / statistics.median(gaps), "mean_tok_s": len(gaps) / sum(gaps)}


def _export_packed(cfg: Config, packings: list[str], folder: Path) -> dict[str, Path]:
    """Random HGF training model (B ≠ 0, so the correction is real work) -> one file per packing."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0.0, 0.02)
    files = {}
    for packing in packings:
        files[packing] = folder / f"hgf_{packing}.hgf"
        export_model(model, cfg, files[packing], packing)
    return files


def _warm_up(path: Path, device: torch.device) -> None:
    """One-time costs that are not model memory (lazy imports of the meta-device build, the
    kernel library and its thread pool) happen here, before any RSS is measured."""
    header = read_header(path)
    layer = PackedTernaryLinear(64, 64, header.packing, device=device)
    layer.weight_packed.zero_()
    layer.weight_scale.fill_(1.0)
    layer(torch.ones(1, 64, device=device))


def _load_variant(kind: str, path: Path | None, size: str, device: torch.device) -> nn.Module:
    if path is None:
        torch.manual_seed(0)
        model = build_model(bench_config(size, "dense"), device).to(DENSE_DTYPES[kind])
    else:
        model, _ = load_packed(path, device)
    return model.eval().requires_grad_(False)


def run_decode(device: torch.device, size: str, tokens: int, prompt_len: int,
               packings: list[str], dense: list[str], rank: int = 8, rounds: int = 3
               ) -> list[dict]:
    """Load the variants one after the other (memory measured per load, with a short warm-up
    decode), then time ``rounds`` rounds in which every variant decodes once, so that a change
    in machine load hits all variants alike; report the median round of each."""
    rows, models = [], []
    with tempfile.TemporaryDirectory(prefix="hgf-bench-") as tmp:
        files = _export_packed(bench_config(size, "hgf", rank), packings, Path(tmp))
        if packings:
            _warm_up(files[packings[0]], device)
        variants = [(f"dense {d}", d, None) for d in dense]
        variants += [(f"packed {p} HGF", p, files[p]) for p in packings]
        for label, kind, path in variants:
            rss0 = rss_bytes()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                cuda0 = torch.cuda.memory_allocated(device)
            model = _load_variant(kind, path, size, device)
            generate_ids(model, _prompt(model, prompt_len), max_new_tokens=4)  # warm-up
            row = {"variant": label, "params": sum(p.numel() for p in model.parameters()),
                   "weight_bytes": model_bytes(model)}
            row["rss_delta_bytes"] = rss_bytes() - rss0 if device.type == "cpu" else None
            if device.type == "cuda":
                row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - cuda0
            rows.append(row)
            models.append(model)
    runs: list[list[dict]] = [[] for _ in rows]
    for _ in range(rounds):
        for model, out in zip(models, runs, strict=True):
            out.append(decode_speed(model, _prompt(model, prompt_len), tokens))
    for row, out in zip(rows, runs, strict=True):
        out.sort(key=lambda r: r["decode_tok_s"])
        row.update(out[len(out) // 2])
        row["ms_per_token"] = 1e3 / row["decode_tok_s"]
        row["rounds_tok_s"] = [r["decode_tok_s"] for r in out]
    base = next((r for r in rows if r["variant"] == "dense float32"), None)
    for r in rows:
        r["speedup_vs_f32"] = r["decode_tok_s"] / base["decode_tok_s"] if base else None
        r["memory_vs_f32"] = r["weight_bytes"] / base["weight_bytes"] if base else None
    return rows


def format_decode(rows: list[dict]) -> str:
    mem_col = "CUDA peak MiB" if rows and "cuda_peak_bytes" in rows[0] else "RSS delta MiB"
    lines = [f"{'variant':<16}{'tok/s':>8}{'mean tok/s':>11}{'ms/token':>9}{'prefill ms':>11}"
             f"{'weights MiB':>12}{mem_col:>15}{'speed vs f32':>13}{'weights vs f32':>15}"]
    for r in rows:
        mem = r.get("cuda_peak_bytes") or r.get("rss_delta_bytes") or 0
        sp = f"{r['speedup_vs_f32']:.2f}x" if r["speedup_vs_f32"] else "-"
        mr = f"{r['memory_vs_f32']:.3f}" if r["memory_vs_f32"] else "-"
        lines.append(f"{r['variant']:<16}{r['decode_tok_s']:>8.1f}{r['mean_tok_s']:>11.1f}"
                     f"{r['ms_per_token']:>9.2f}{r['prefill_ms']:>11.1f}"
                     f"{r['weight_bytes'] / MIB:>12.1f}{mem / MIB:>15.1f}{sp:>13}{mr:>15}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--size", default="base100m", help="model.size of the decode models")
    p.add_argument("--rank", type=int, default=8, help="HGF correction rank")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (median reported)")
    p.add_argument("--packings", nargs="+", default=list(PACKINGS), choices=list(PACKINGS))
    p.add_argument("--dense", nargs="+", default=list(DENSE_DTYPES), choices=list(DENSE_DTYPES))
    p.add_argument("--gemv-sizes", type=int, nargs="*", default=None,
                   help="GEMV sizes n (n×n); default 2048 4096 (+ 8192 on GPU); none to skip")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--peer", choices=("llama.cpp",), default=None,
                   help="also time the same weights in llama.cpp (GGUF, via llama-cpp-python)")


def run(args: argparse.Namespace, overrides: list[str] | None = None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peer:  # fail in one line before the long runs when llama-cpp-python is missing
        from hgf.gguf.llama import require_llama_cpp

        require_llama_cpp()
    device = resolve_device(args.device)
    sizes = args.gemv_sizes
    if sizes is None:
        sizes = [2048, 4096] + ([8192] if device.type == "cuda" else [])
    env = environment(device)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    out: dict = {"env": env}
    if sizes:
        out["read_gb_s"], out["copy_gb_s"] = read_bandwidth(device), copy_bandwidth(device)
        out["gemv"] = gemv_table(tuple(sizes), device)
        print(f"\n# GEMV, one token x [1, n] times [n, n] (read bandwidth "
              f"{out['read_gb_s']:.1f} GB/s, copy {out['copy_gb_s']:.1f} GB/s)")
        print(format_table(out["gemv"], out["read_gb_s"]))
    out["decode"] = run_decode(device, args.size, args.tokens, args.prompt_len, args.packings,
                               args.dense, args.rank, args.rounds)
    print(f"\n# decode, model.size={args.size}, differential attention, greedy "
          f"{args.tokens} tokens after a {args.prompt_len}-token prompt, batch 1")
    print(format_decode(out["decode"]))
    if args.peer:  # records with "system": "hgf" | "llama.cpp" (hgf.gguf.peer)
        from hgf.gguf.peer import run_from_args

        out["decode"] += run_from_args(args)
    out["env"]["loadavg_1m_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hgf.infer.bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
