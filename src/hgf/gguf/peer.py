"""``hgf bench infer --peer llama.cpp``: hgf's packed runtime against llama.cpp on the same weights.

Arms (random weights at ``--size``, tied embeddings, SwiGLU, SubLN; HGF corrections with B ≠ 0 so
the correction is real work):

    bitnet-std   ternary, standard attention   hgf i2 | tq1     llama.cpp TQ2_0 | TQ1_0
    hgf-std      + rank-r correction           hgf i2 | tq1     llama.cpp TQ2_0 | TQ1_0 + LoRA
    hgf-diff     differential attention        hgf i2 | tq1     (no llama.cpp equivalent)

Each hgf model is exported to hgf's packed file and loaded with ``load_for_decode`` (the native
decoder, as ``hgf generate`` runs it); the same training model is exported to GGUF
(hgf.gguf.export) and loaded in llama.cpp (hgf.gguf.llama).
Every run is the same work: a fixed random prompt of ``prompt_len`` tokens, then ``tokens``
greedy tokens (never stopping early), batch 1, the same thread count. hgf runs
``hgf.infer.generate_ids``; llama.cpp runs one ``llama_decode`` + one C greedy sampler call per
token in a tight loop (no Python generate loop).

Timing, per run: ``cpu_ms_per_token`` = process CPU time (``time.process_time``, all threads)
over the decode phase (tokens 2..N: the forwards after the prefill) / (N − 1);
``tok_per_s`` = (N − 1) / the decode phase's wall time; ``prompt_tok_per_s`` = prompt_len / the
prefill's wall time (prefill + first token). Runs go in rounds, and in a round every hgf run of
an arm and packing is followed at once by the llama.cpp run of the same pair (A B A B), so a
change of machine load hits both; records hold the median round, and ``vs_llama_cpp`` is the
median over rounds of the per-round ratio hgf / llama.cpp CPU ms per token.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hgf.config import Config, config_from_dict
from hgf.errors import HGFError
from hgf.gguf.export import PACKING_TYPES, export_model_gguf, gguf_arch
from hgf.gguf.llama import LlamaCpp, require_llama_cpp
from hgf.infer.decode_bench import ARMS  # the decode benchmark's arms
from hgf.infer.engine import load_for_decode
from hgf.infer.export import export_model
from hgf.infer.generate import generate_ids
from hgf.kernels.packing import PACKINGS
from hgf.model.transformer import build_model

PEERS = ("llama.cpp",)


def peer_config(size: str, arm: str, rank: int = 8) -> Config:
    linear, attention = ARMS[arm]
    return config_from_dict({"model": {"size": size, "linear": linear, "attention": attention,
                                       "subln": "on", "mlp": "swiglu", "tie_embeddings": True},
                             "hgf": {"rank": rank}}, "hgf bench infer --peer")


def random_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0.0, 0.02)
    return model.eval()


def _hgf_run(model, prompt: list[int], tokens: int) -> dict:
    stamps: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    generate_ids(model, prompt, max_new_tokens=tokens,
                 on_token=lambda _: stamps.append((time.perf_counter(), time.process_time())))
    (w1, c1), (w2, c2) = stamps[0], stamps[-1]
    return _record(len(prompt), w1 - t0, w2 - w1, c2 - c1, len(stamps) - 1)


def _llama_run(lm: LlamaCpp, prompt: list[int], tokens: int) -> dict:
    t: dict = {}
    lm.greedy(prompt, tokens, timing=t)
    return _record(len(prompt), t["prefill_s"], t["decode_wall_s"], t["decode_cpu_s"],
                   t["decode_tokens"])


def _record(prompt_len: int, prefill_s: float, wall_s: float, cpu_s: float, n: int) -> dict:
    return {"cpu_ms_per_token": 1e3 * cpu_s / n, "tok_per_s": n / wall_s,
            "prompt_tok_per_s": prompt_len / prefill_s}


def _gguf_exportable(arm: str) -> bool:
    """Whether llama.cpp has the arm's projections (not Tequila's bias nor Sherry's 3:4 rule;
    differential attention is run on hgf's side only, as before)."""
    cfg = peer_config("base100m", arm)
    cfg.model.attention = "standard"
    try:
        gguf_arch(cfg)
    except HGFError:
        return False
    return True


def run_peer(peer: str = "llama.cpp", size: str = "base100m", tokens: int = 64,
             prompt_len: int = 16, packings: list[str] | None = None, threads: int | None = None,
             rounds: int = 3, rank: int = 8, arms: list[str] | None = None,
             log=print, embeddings: str = "fp16", kv_cache: str = "f32") -> list[dict]:
    """The ``decode`` records of both systems (see the module docstring). ``embeddings`` is
    the type of the tied embedding/head in both files: fp16 (GGUF F16) or int8 (hgf's int8
    rows, GGUF Q8_0), so that both systems stream a head of the same width. ``kv_cache`` is hgf's
    (the native decoder's) KV cache type; llama.cpp keeps its default, f16."""
    require_llama_cpp()
    # the packings llama.cpp has a type for (a requested sherry is hgf's alone)
    packings = [p for p in (packings or PACKINGS) if p in PACKING_TYPES]
    arms = arms or [a for a in ARMS if _gguf_exportable(a)]
    threads = threads or torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    runs = []  # (system, arm, packing, runner, extra) in the A B A B order
    lms: list[LlamaCpp] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hgf-peer-") as tmp:
            for arm in arms:
                cfg = peer_config(size, arm, rank)
                model = random_model(cfg)
                prompt = torch.randint(1, cfg.model.vocab_size, (prompt_len,), generator=g).tolist()
                for packing in packings:
                    f = Path(tmp) / f"{arm}-{packing}.hgf"
                    export_model(model, cfg, f, packing, embeddings=embeddings)
                    packed, _ = load_for_decode(f, "cpu", kv_cache=kv_cache)  # `hgf generate`'s
                    runs.append(("hgf", arm, packing, lambda m=packed, p=prompt: _hgf_run(
                        m, p, tokens), {"file_bytes": f.stat().st_size,
                                        "embeddings": embeddings, "kv_cache": kv_cache}))
                    if cfg.model.attention != "standard":
                        continue
                    gf = Path(tmp) / f"{arm}-{packing}.gguf"
                    info = export_model_gguf(model, cfg, gf, packing, embeddings, force=True)
                    lm = LlamaCpp(gf, info.get("adapter"), n_ctx=prompt_len + tokens + 8,
                                  threads=threads)
                    lms.append(lm)
                    size_b = sum(p.stat().st_size for p in info["files"])
                    runs.append((peer, arm, PACKING_TYPES[packing].lower(),
                                 lambda m=lm, p=prompt: _llama_run(m, p, tokens),
                                 {"file_bytes": size_b, "lora": "adapter" in info,
                                  "embeddings": embeddings, "kv_cache": "f16"}))
                log(f"# peer bench: {arm} ready (hgf {', '.join(packings)}"
                    + ("" if cfg.model.attention != "standard" else " + llama.cpp") + ")")
        for _, _, _, run, _ in runs:  # warm-up (kernel builds, thread pools, page faults)
            run()
        per_run: list[list[dict]] = [[] for _ in runs]
        load = []
        for r in range(rounds):
            for i, (_, _, _, run, _) in enumerate(runs):
                per_run[i].append(run())
            load.append(os.getloadavg()[0])
            log(f"# peer bench: round {r + 1}/{rounds} done (load average {load[-1]:.2f})")
    finally:
        for lm in lms:
            lm.close()
    return _records(runs, per_run, threads, tokens, prompt_len, load)


def _records(runs, per_run, threads, tokens, prompt_len, load) -> list[dict]:
    out = []
    for (system, arm, packing, _, extra), rs in zip(runs, per_run, strict=True):
        cpu = [r["cpu_ms_per_token"] for r in rs]
        mid = sorted(rs, key=lambda r: r["cpu_ms_per_token"])[len(rs) // 2]
        out.append({"system": system, "arm": arm, "packing": packing, "threads": threads, **mid,
                    "rounds_cpu_ms_per_token": cpu, "tokens": tokens, "prompt_len": prompt_len,
                    "loadavg_1m": load, **extra})
    peers = {(r["arm"], r["packing"]): r for r in out if r["system"] != "hgf"}
    for r in out:
        p = peers.get((r["arm"], PACKING_TYPES[r["packing"]].lower())) if r["system"] == "hgf" else None
        if p is not None:
            ratios = [a / b for a, b in zip(r["rounds_cpu_ms_per_token"],
                                            p["rounds_cpu_ms_per_token"], strict=True)]
            r["vs_llama_cpp"] = statistics.median(ratios)
    return out


def format_peer(records: list[dict]) -> str:
    lines = [f"{'system':<11}{'arm':<12}{'packing':<9}{'threads':>8}{'CPU ms/tok':>12}"
             f"{'tok/s':>9}{'prompt tok/s':>14}{'MiB':>8}{'hgf/llama.cpp CPU':>19}"]
    for r in records:
        ratio = f"{r['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in r else "-"
        lines.append(f"{r['system']:<11}{r['arm']:<12}{r['packing']:<9}{r['threads']:>8}"
                     f"{r['cpu_ms_per_token']:>12.2f}{r['tok_per_s']:>9.1f}"
                     f"{r['prompt_tok_per_s']:>14.1f}{r['file_bytes'] / 2**20:>8.1f}{ratio:>19}")
    return "\n".join(lines)


def run_from_args(args) -> list[dict]:
    """The ``--peer`` part of ``hgf bench infer`` (hgf.infer.bench calls this)."""
    records = run_peer(args.peer, args.size, args.tokens, args.prompt_len, list(args.packings),
                       args.threads, args.rounds, args.rank,
                       embeddings=getattr(args, "embeddings", "fp16"),
                       kv_cache=getattr(args, "kv_cache", "f32"))
    emb, kv = getattr(args, "embeddings", "fp16"), getattr(args, "kv_cache", "f32")
    print(f"\n# decode vs {args.peer}, model.size={args.size}, tied {emb} embeddings, hgf KV "
          f"cache {kv} (llama.cpp's f16), greedy "
          f"{args.tokens} tokens after a {args.prompt_len}-token prompt, batch 1, median of "
          f"{args.rounds} interleaved rounds; CPU ms/token = process CPU time / decode tokens")
    print(format_peer(records))
    return records
