"""Inference benchmark: GEMV kernels, then decode speed and memory of a ~100M-parameter model,
every arm and packing (bitnet-std, hgf-std, hgf-diff, tequila-std × i2, tq1; sherry-std × sherry)
through what ``hgf generate`` runs (the native decoder; the reference path for tequila and
sherry), next to the PyTorch reference path on the same files and the same architecture
with dense float32 / bfloat16 projections (hgf.infer.decode_bench).

Decode is bandwidth bound: tokens/s ≤ bandwidth / bytes read per token, and the packed model reads
2 (i2) or 1.6 (tq1) bits per ternary weight instead of 32 or 16. Every variant runs the same
greedy loop (hgf.infer.generate_ids: prefill of a random prompt, then KV-cached decode of N
tokens, never stopping early), in interleaved rounds. Per variant: CPU ms per token (process CPU
time of the decode phase / tokens), tok/s (1 / median time between consecutive tokens, robust to
the preemptions of a shared machine), prompt tok/s, peak RSS while decoding (CPU) or the growth of
torch.cuda.max_memory_allocated (CUDA). The JSON's ``decode`` list holds one record per arm and
packing as ``hgf generate`` runs it (``decode_bench.decode_record``; peers such as llama.cpp add
theirs), ``decode_reference`` the reference-path and dense rows.

The models have random weights (speed does not depend on the values); the packed ones are exported
from training models through the real file format.

    python -m hgf.infer.bench --device cpu --tokens 64 --threads 1
    hgf bench infer --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from hgf.infer.decode_bench import ARMS, DENSE_DTYPES, format_decode_records, run_decode_bench
from hgf.infer.format import EMBEDDINGS
from hgf.infer.load import resolve_device
from hgf.kernels import PACKINGS
from hgf.kernels.bench import (
    copy_bandwidth,
    environment,
    format_table,
    gemv_table,
    read_bandwidth,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--size", default="base100m", help="model.size of the decode models")
    p.add_argument("--rank", type=int, default=8, help="HGF correction rank")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (median reported)")
    p.add_argument("--packings", nargs="+", default=list(PACKINGS), choices=list(PACKINGS))
    p.add_argument("--dense", nargs="*", default=list(DENSE_DTYPES), choices=list(DENSE_DTYPES),
                   help="dense reference rows (none: --dense with no value)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--embeddings", default="fp16", choices=list(EMBEDDINGS),
                   help="embeddings and head in the packed files (export --embeddings)")
    p.add_argument("--kv-cache", default="f32", choices=["f32", "f16"],
                   help="the native decoder's KV cache type (f16: llama.cpp's default)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the PyTorch reference-path rows of the packed files")
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
    out["decode"], out["decode_reference"] = run_decode_bench(
        device, args.size, args.arms, args.packings, args.dense, args.tokens, args.prompt_len,
        args.rounds, args.rank, args.embeddings, args.reference, args.kv_cache)
    print(f"\n# decode, model.size={args.size}, greedy {args.tokens} tokens after a "
          f"{args.prompt_len}-token prompt, batch 1, {args.embeddings} embeddings/head, "
          f"{args.kv_cache} KV cache (native decoder), median of "
          f"{args.rounds} interleaved rounds")
    print(format_decode_records(out["decode"] + out["decode_reference"]))
    if args.peer:  # both systems on the same weights in A B A B rounds (hgf.gguf.peer): these
        from hgf.gguf.peer import run_from_args  # records, with their ratios, become "decode"

        out["decode_without_peer"], out["decode"] = out["decode"], run_from_args(args)
    out["env"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hgf.infer.bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
