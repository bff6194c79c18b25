"""``hgf generate PATH --prompt TEXT``: stream a continuation from a run directory (the training
model) or an exported file (the packed model). The prompt and the generated text go to stdout;
the token count, speed and stop reason go to stderr."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hgf.errors import HGFError
from hgf.infer.generate import check_sampling, generate
from hgf.infer.load import load_for_generation, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a run directory or a packed file")
    p.add_argument("path", help="run directory or packed file written by `hgf export`")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default 1337)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 suits small models on a busy "
                        "machine)")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                   help="packed files: the native decoder's KV cache type (f16: half the bytes, "
                        "as llama.cpp's default; f32: the reference path's numbers)")
    p.set_defaults(func=run, takes_overrides=False)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.threads < 0:
        raise HGFError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_generation(args.path, resolve_device(args.device), args.kv_cache)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write(args.prompt)
    t0 = time.perf_counter()
    out = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                   args.top_k, args.top_p, args.seed, stream=write)
    dt = time.perf_counter() - t0
    write("\n")
    note = " (model.max_seq_len reached)" if out.stop_reason == "max_seq_len" else ""
    print(f"[{len(out.ids)} tokens in {dt:.2f} s, {len(out.ids) / dt:.1f} tok/s, "
          f"stop: {out.stop_reason}{note}]", file=sys.stderr)
    return 0
