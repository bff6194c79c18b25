"""Interleaved A/B of the native decoder's switches (hgf.infer.engine.OPT_*), in one process.

    python scripts/decode_ablation.py [--arms bitnet-std hgf-diff] [--packing i2]
                                      [--embeddings fp16] [--rounds 21] [--tokens 60]
                                      [--options 0 32 ...] [--kv-cache f32 f16]
                                      [--prompt N]

For each arm, a random base100m model exported through the real file format (as ``hgf bench
infer`` does), decoded by the native decoder with each option set in turn, every round (so a change
of machine load hits all alike); one thread. Prints per variant (option set x KV cache type) the
median CPU ms per decoded token and the median per-round ratio to the first variant. Each switch
undoes one fusion or layout choice; 0 = the default decoder. ``--prompt N`` times an N-token
prompt (one batched call) instead, in prompt tokens per CPU second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hgf.infer import engine
from hgf.infer.decode_bench import _random_prompt, arm_config, export_arm, loadavg
from hgf.infer.engine import NativeModel

NAMES = {v: k for k, v in vars(engine).items() if k.startswith("OPT_")}


def label(opt: int) -> str:
    return "default" if opt == 0 else " | ".join(n for b, n in NAMES.items() if opt & b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["bitnet-std", "hgf-diff"])
    p.add_argument("--packing", default="i2")
    p.add_argument("--embeddings", default="fp16")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--options", type=int, nargs="+", default=[0, engine.OPT_HEAD_ROWS4])
    p.add_argument("--kv-cache", nargs="+", default=["f32"], choices=engine.KV_CACHE_TYPES)
    p.add_argument("--prompt", type=int, default=0, help="time an N-token prompt instead")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"loadavg before: {loadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for arm in a.arms:
            path = export_arm("base100m", arm, 8, [a.packing], a.embeddings, Path(tmp))[a.packing]
            m = NativeModel.from_file(path)
            prompt = _random_prompt(arm_config("base100m", arm), a.prompt or 16)
            variants = [(o, kv) for kv in a.kv_cache for o in a.options]
            times: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
            for _ in range(a.rounds):
                for opt, kv in variants:
                    m.kv_cache = kv
                    m.set_options(opt)
                    m.setup_caches(len(prompt) + a.tokens + 1)
                    c0 = time.process_time()
                    m.forward(prompt, 0)
                    if a.prompt:  # ms per prompt token
                        times[opt, kv].append(1e3 * (time.process_time() - c0) / len(prompt))
                    else:
                        c0 = time.process_time()
                        for i in range(a.tokens):
                            m.forward([1 + i], len(prompt) + i)
                        times[opt, kv].append(1e3 * (time.process_time() - c0) / a.tokens)
                    m.clear_caches()
            base = times[variants[0]]
            what = f"a {a.prompt}-token prompt" if a.prompt else f"{a.tokens} tokens"
            print(f"\n{arm} {a.packing}, {a.embeddings} embeddings/head, {a.rounds} rounds of "
                  f"{what} (ms per token)")
            for v in variants:
                ratio = statistics.median(t / b for t, b in zip(times[v], base, strict=True))
                print(f"  {label(v[0]) + ', KV ' + v[1]:48s} {statistics.median(times[v]):6.3f} "
                      f"ms/token  ratio {ratio:.3f}")
    print(f"\nloadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
