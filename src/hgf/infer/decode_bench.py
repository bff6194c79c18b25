"""The decode part of ``hgf bench infer``: every arm and packing of one model shape, decoded the way
``hgf generate`` decodes a packed file (the native decoder on the CPU, hgf.infer.engine), next to
the PyTorch reference path on the same file and the dense float32 / bfloat16 model.

Arms (random weights, exported through the real file format; speed does not depend on values):
    bitnet-std   bitlinear projections, standard attention
    hgf-std      HGF rank r (B' != 0, so the correction is real work), standard attention
    hgf-diff     HGF rank r, differential attention (the paper's arm)
    tequila-std  Tequila (BitNet + its folded dead-zone bias), standard attention
    sherry-std   Sherry (3:4 sparse ternary, the sherry packing), standard attention
    ptqtp-std    PTQTP (two trit-planes and row scales per projection), standard attention
SubLN, SwiGLU and tied embeddings for every arm (the models of ``--peer llama.cpp``, hgf.gguf.peer);
the dense rows are the hgf-diff shape with dense projections.

Every variant decodes greedy tokens after the same random prompt, never stopping early, in
interleaved rounds (every variant once per round, so a change of machine load hits all alike);
each metric is the median over rounds. One record per variant (:func:`decode_record`):
    cpu_ms_per_token   process CPU time of the decode phase (first to last token) / tokens
    tok_per_s          1 / median time between consecutive tokens
    prompt_tok_per_s   prompt tokens / wall time of the prefill (to the first token)
    peak_rss_delta_bytes  peak RSS while decoding (VmHWM, reset after loading) minus the RSS
                          before loading; beside it the file's bytes and the KV cache's
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from hgf.config import Config, config_from_dict
from hgf.infer.engine import NativeModel, unsupported_reason
from hgf.infer.export import export_model
from hgf.infer.generate import generate_ids
from hgf.infer.packed import PackedTernaryLinear, load_packed
from hgf.kernels.packing import PACKING_REGISTRY, PACKINGS
from hgf.memory import report_for_config
from hgf.model.hgf_linear import HGFLinear
from hgf.model.transformer import build_model

# the decode benchmark's arms (hgf bench infer, and its llama.cpp peer): (model.linear, attention)
ARMS = {"bitnet-std": ("bitlinear", "standard"), "hgf-std": ("hgf", "standard"),
        "hgf-diff": ("hgf", "differential"), "tequila-std": ("tequila", "standard"),
        "sherry-std": ("sherry", "standard"), "ptqtp-std": ("ptqtp", "standard")}




def arm_packings(cfg: Config, packings: list[str]) -> list[str]:
    """The requested packings made for the arm's model: those of its sparsity (the sherry arm,
    3:4: sherry alone), or the ones that hold any ternary weight (i2, tq1) for the others."""
    sparsity = report_for_config(cfg).sparsity
    return [p for p in packings if PACKING_REGISTRY[p].sparsity == sparsity]


DENSE_ARM = "dense-diff"
DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIB = 2**20


def arm_config(size: str, arm: str, rank: int = 8) -> Config:
    linear, attention = ARMS.get(arm, ("dense", "differential"))
    return config_from_dict({"model": {"size": size, "linear": linear, "attention": attention,
                                       "subln": "on", "mlp": "swiglu", "tie_embeddings": True},
                             "hgf": {"rank": rank}}, "hgf bench infer")


def decode_record(system: str, arm: str, packing: str, threads: int, cpu_ms_per_token: float,
                  tok_per_s: float, prompt_tok_per_s: float, **extra) -> dict:
    """One row of the JSON ``decode`` list (hgf and its peers, e.g. llama.cpp, alike)."""
    return {"system": system, "arm": arm, "packing": packing, "threads": threads,
            "cpu_ms_per_token": cpu_ms_per_token, "tok_per_s": tok_per_s,
            "prompt_tok_per_s": prompt_tok_per_s, **extra}


# ---------------------------------------------------------------------------------------------
# Measuring


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


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM of this process, 0 where unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def time_decode(model, prompt: list[int], tokens: int, native: bool | None) -> dict:
    """Greedy prefill + ``tokens`` decoded tokens: speeds and CPU time (see the module doc)."""
    stamps: list[float] = []
    cpus: list[float] = []

    def stamp(_: int) -> None:
        stamps.append(time.perf_counter())
        cpus.append(time.process_time())

    t0, c0 = time.perf_counter(), time.process_time()
    generate_ids(model, prompt, max_new_tokens=tokens, native=native, on_token=stamp)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # noqa: B905 (lengths differ by design)
    steps = max(1, len(stamps) - 1)
    return {"tok_per_s": 1 / statistics.median(gaps) if gaps else 0.0,
            "mean_tok_per_s": len(gaps) / sum(gaps) if gaps else 0.0,
            "cpu_ms_per_token": 1e3 * (cpus[-1] - cpus[0]) / steps,
            "prefill_ms": 1e3 * (stamps[0] - t0),
            "prompt_tok_per_s": len(prompt) / (stamps[0] - t0),
            "prompt_cpu_ms": 1e3 * (cpus[0] - c0), "tokens": len(stamps)}


def _random_prompt(cfg: Config, prompt_len: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, cfg.model.vocab_size, (prompt_len,), generator=g).tolist()


def export_arm(size: str, arm: str, rank: int, packings: list[str], embeddings: str,
               folder: Path) -> dict[str, Path]:
    """A random model of ``arm`` (HGF: B ~ N(0, 0.02), not 0; PTQTP: random trit-planes and row
    scales) -> one packed file per packing."""
    from hgf.model.ptqtp import PTQTPLinear

    cfg = arm_config(size, arm, rank)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HGFLinear):
                m.B.normal_(0.0, 0.02)
            if isinstance(m, PTQTPLinear):
                m.planes.copy_(torch.randint(-1, 2, m.planes.shape))
                m.alpha.uniform_(0.005, 0.02)
    files = {}
    for packing in packings:
        files[packing] = folder / f"{arm}_{packing}.hgf"
        export_model(model, cfg, files[packing], packing, embeddings=embeddings)
    return files


def _native(path: Path, kv_cache: str) -> NativeModel:
    model = NativeModel.from_file(path)
    model.kv_cache = kv_cache
    return model


def _warm_up(device: torch.device) -> None:
    """One-time costs that are not model memory (kernel library, thread pool, lazy imports)."""
    layer = PackedTernaryLinear(64, 64, "i2", device=device)
    layer.weight_packed.zero_()
    layer.weight_scale.fill_(1.0)
    layer(torch.ones(1, 64, device=device))


def model_bytes(model) -> int:
    if isinstance(model, NativeModel):
        return model.weight_bytes()
    seen = {t.data_ptr(): t.numel() * t.element_size()
            for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


class Variant:
    def __init__(self, record: dict, load, native: bool, primary: bool) -> None:
        self.record, self.load, self.native, self.primary = record, load, native, primary
        self.model: nn.Module | NativeModel | None = None
        self.rounds: list[dict] = []


def run_decode_bench(device: torch.device, size: str = "base100m", arms: list[str] | None = None,
                     packings: list[str] | None = None, dense: list[str] | None = None,
                     tokens: int = 64, prompt_len: int = 16, rounds: int = 3, rank: int = 8,
                     embeddings: str = "fp16", reference: bool = True, kv_cache: str = "f32"
                     ) -> tuple[list[dict], list[dict]]:
    """(records of what ``hgf generate`` runs: the native decoder on the CPU, else the reference
    path; records of the PyTorch reference path and the dense models, for comparison)."""
    arms = list(ARMS) if arms is None else arms
    packings = list(PACKINGS) if packings is None else packings
    dense = list(DENSE_DTYPES) if dense is None else dense
    threads = torch.get_num_threads()
    variants: list[Variant] = []
    with tempfile.TemporaryDirectory(prefix="hgf-bench-") as tmp:
        for arm in arms:
            cfg = arm_config(size, arm, rank)
            files = export_arm(size, arm, rank, arm_packings(cfg, packings), embeddings, Path(tmp))
            native = unsupported_reason(cfg, device) is None
            for packing, path in files.items():
                base = dict(file_bytes=path.stat().st_size, embeddings=embeddings)
                if native:
                    variants.append(Variant(
                        decode_record("hgf", arm, packing, threads, 0, 0, 0, engine="native",
                                      kv_cache=kv_cache, **base),
                        lambda p=path: _native(p, kv_cache), True, True))
                if reference or not native:
                    variants.append(Variant(
                        decode_record("hgf", arm, packing, threads, 0, 0, 0, engine="reference",
                                      **base), lambda p=path: load_packed(p, device)[0], False,
                        not native))
        for name in dense:
            def load_dense(name=name):
                torch.manual_seed(0)
                model = build_model(arm_config(size, DENSE_ARM), device).to(DENSE_DTYPES[name])
                return model.eval().requires_grad_(False)
            variants.append(Variant(decode_record("hgf", DENSE_ARM, name, threads, 0, 0, 0,
                                                  engine="reference"), load_dense, False, False))
        _warm_up(device)
        for v in variants:  # load one after the other: memory per variant
            rss0 = rss_bytes()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                cuda0 = torch.cuda.memory_allocated(device)
            v.model = v.load()
            rss_loaded = rss_bytes()
            cfg = v.model.cfg
            prompt = _random_prompt(cfg, prompt_len)
            reset_peak_rss()
            time_decode(v.model, prompt, tokens, v.native)  # warm-up, full length: KV cache too
            m = cfg.model
            cpu_dev = device.type == "cpu"
            v.record.update(
                weight_bytes=model_bytes(v.model),
                rss_delta_bytes=rss_loaded - rss0 if cpu_dev else None,
                peak_rss_delta_bytes=max(peak_rss_bytes(), rss_loaded) - rss0 if cpu_dev else None,
                kv_cache_bytes=m.n_layers * 2 * m.d_model * (prompt_len + tokens) * 4)
            if device.type == "cuda":
                v.record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - cuda0
    for _ in range(rounds):
        for v in variants:
            v.rounds.append(time_decode(v.model, _random_prompt(v.model.cfg, prompt_len), tokens,
                                        v.native))
    for v in variants:
        for key in ("cpu_ms_per_token", "tok_per_s", "mean_tok_per_s", "prompt_tok_per_s",
                    "prefill_ms", "prompt_cpu_ms"):
            v.record[key] = statistics.median(r[key] for r in v.rounds)
        v.record["ms_per_token"] = 1e3 / v.record["tok_per_s"] if v.record["tok_per_s"] else None
        v.record["tokens"] = v.rounds[0]["tokens"] if v.rounds else 0
        v.record["prompt_tokens"] = prompt_len
        v.record["rounds_cpu_ms_per_token"] = [r["cpu_ms_per_token"] for r in v.rounds]
        v.record["rounds_tok_per_s"] = [r["tok_per_s"] for r in v.rounds]
        if v.record.get("file_bytes"):
            v.record["peak_rss_vs_file_kv"] = (
                v.record["peak_rss_delta_bytes"] / (v.record["file_bytes"] + v.record["kv_cache_bytes"])
                if v.record.get("peak_rss_delta_bytes") else None)
    main = [v.record for v in variants if v.primary]
    rest = [v.record for v in variants if not v.primary]
    _compare(main, rest)
    return main, rest


def _compare(main: list[dict], rest: list[dict]) -> None:
    """Speed ratios in the same interleaved run: vs the reference path on the same file, and vs
    dense float32 (CPU ms per token)."""
    ref = {(r["arm"], r["packing"]): r for r in rest if r["engine"] == "reference"}
    f32 = next((r for r in rest if r["arm"] == DENSE_ARM and r["packing"] == "float32"), None)
    for r in main + rest:
        other = ref.get((r["arm"], r["packing"])) if r["engine"] == "native" else None
        r["speedup_vs_reference"] = (other["cpu_ms_per_token"] / r["cpu_ms_per_token"]
                                     if other else None)
        r["speedup_vs_dense_f32"] = (f32["cpu_ms_per_token"] / r["cpu_ms_per_token"]
                                     if f32 else None)


def format_decode_records(records: list[dict]) -> str:
    lines = [f"{'system':<10}{'engine':<10}{'arm':<12}{'packing':<9}{'thr':>4}{'cpu ms/tok':>11}"
             f"{'tok/s':>8}{'prompt tok/s':>13}{'peak RSS MiB':>13}{'file+KV MiB':>12}"
             f"{'vs ref':>8}{'vs f32':>8}"]
    for r in records:
        peak = r.get("peak_rss_delta_bytes")
        fk = (r["file_bytes"] + r["kv_cache_bytes"]) / MIB if r.get("file_bytes") else None
        lines.append(
            f"{r['system']:<10}{r.get('engine', '-'):<10}{r['arm']:<12}{r['packing']:<9}"
            f"{r['threads']:>4}{r['cpu_ms_per_token']:>11.2f}{r['tok_per_s']:>8.1f}"
            f"{r['prompt_tok_per_s']:>13.1f}"
            f"{peak / MIB if peak else float('nan'):>13.1f}"
            f"{fk if fk else float('nan'):>12.1f}"
            f"{_x(r.get('speedup_vs_reference')):>8}{_x(r.get('speedup_vs_dense_f32')):>8}")
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else "-"


def loadavg() -> tuple[float, float, float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()
    return None
