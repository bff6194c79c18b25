"""Check ``hgf plan`` against real CPU training steps; writes results/plan_check.md.

    PYTHONPATH=src python scripts/plan_check.py [--size small] [--batch 8] [--seq 256]

For each arm, in a fresh subprocess (float32 on CPU, AdamW foreach, one warm-up step, then one
measured step: forward, backward, optimizer step, zero_grad(set_to_none=True)):
  * parameters and AdamW state bytes, summed over the real tensors (exact comparison);
  * the activations autograd keeps after the forward (distinct saved storages, exact comparison);
  * the peak of tensor memory during the step, from torch.profiler's memory timeline;
  * the peak RSS growth of the process during the step (VmHWM after resetting it).
The plan is the single-process column (no DDP buckets) with autocast off; differential attention
uses ``attention_kernel="math"`` since CPU runs it on the math kernel. Activation checkpointing is
hgf.parallel.parallelize's (per block, non-reentrant torch.utils.checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("fp16", "bitnet", "hgf_std", "hgf")
MIB = 2**20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(arm: str, size: str, batch: int, seq: int, ac: bool, profile: bool) -> dict:
    import torch

    from hgf.config import load_config
    from hgf.model import build_model, lm_loss
    from hgf.parallel import parallelize

    sys.path.insert(0, str(ROOT / "tests"))
    from test_plan import SavedBytes

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / f"{arm}.toml", [f"--model.size={size}", f"--train.seq_len={seq}",
                                                        f"--dist.activation_checkpointing={ac}"])
    idx = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1))
    base = _status("VmRSS")
    model = build_model(cfg)
    net = parallelize(model, cfg)  # strategy none: per-block checkpointing when ac
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def forward():
        return lm_loss(net(idx[:, :-1]), idx[:, 1:])

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def saved() -> int:
        with SavedBytes(model) as s:
            forward()
        return s.total

    step()  # creates the AdamW states
    out = {"params": sum(p.numel() * p.element_size() for p in model.parameters()),
           "optimizer": sum(t.numel() * t.element_size() for s in opt.state.values()
                            for k, t in s.items() if k != "step"),
           "saved": saved() if profile and not ac else None}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import _memory_profiler as mp
        from torch.profiler import profile as prof_ctx

        with prof_ctx(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                      with_stack=True) as prof:
            step()
        _, sizes = mp.MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        out["tensor_peak"] = max(sum(row) for row in sizes)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        step()
        out["rss_step_growth"] = _status("VmHWM") - before
        out["rss_total"] = _status("VmHWM") - base
    return out


def plan_numbers(arm: str, size: str, batch: int, seq: int) -> dict:
    from hgf.config import load_config
    from hgf.plan import GIB, make_plan

    cfg = load_config(ROOT / "configs" / f"{arm}.toml", [f"--model.size={size}", f"--train.seq_len={seq}"])
    kernel = "math" if cfg.model.attention == "differential" else "fused"
    plan = make_plan(cfg, 1, 80 * GIB, batch, seq, "ddp", autocast=False, attention_kernel=kernel)
    mem = plan.memory["single"]
    return {"P": plan.report.total_params, "weights": mem.weights, "optimizer": mem.optimizer,
            "activations": mem.activations, "peak": mem.peak(False), "peak_ac": mem.peak(True)}


def _sub(arm, size, batch, seq, ac, profile) -> dict:
    cmd = [sys.executable, __file__, "--one", arm, "--size", size, "--batch", str(batch),
           "--seq", str(seq)] + (["--ac"] if ac else []) + (["--profile"] if profile else [])
    # a fixed mmap threshold makes glibc return freed tensor memory, so RSS follows the tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--one")
    ap.add_argument("--ac", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "plan_check.md"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.size, a.batch, a.seq, a.ac, a.profile)))
        return

    def mib(x: float) -> str:
        return f"{x / MIB:.2f}"

    rows = []
    for arm in ARMS:
        plan = plan_numbers(arm, a.size, a.batch, a.seq)
        for ac in (False, True):
            prof = _sub(arm, a.size, a.batch, a.seq, ac, True)
            rss = _sub(arm, a.size, a.batch, a.seq, ac, False)
            peak = plan["peak_ac" if ac else "peak"]
            saved = "-" if ac else f"{mib(prof['saved'])} / {mib(plan['activations'])}"
            rows.append(f"| {arm} | {'on' if ac else 'off'} | {mib(prof['params'])} / {mib(plan['weights'])} "
                        f"| {mib(prof['optimizer'])} / {mib(plan['optimizer'])} | {saved} "
                        f"| {mib(prof['tensor_peak'])} / {mib(peak)} ({prof['tensor_peak'] / peak:.2f}) "
                        f"| {mib(rss['rss_total'])} ({rss['rss_total'] / peak:.2f}) |")
            print(rows[-1], flush=True)
    cmd = f"PYTHONPATH=src python scripts/plan_check.py --size {a.size} --batch {a.batch} --seq {a.seq}"
    text = "\n".join([
        "# `hgf plan` against real training steps (CPU, float32)", "",
        f"Command: `{cmd}` (2-core shared CPU, torch {__import__('torch').__version__}).", "",
        f"Model size `{a.size}`, micro-batch {a.batch} x {a.seq} tokens, AdamW (foreach), one warm-up "
        "step then one measured step (forward, backward, optimizer step, zero_grad). Each cell: "
        "**measured / planned** in MiB. Planned numbers are the single-process column of "
        "`hgf.plan.make_plan(..., autocast=False)` (differential attention with "
        "`attention_kernel=\"math\"`, which CPU uses).", "",
        "| arm | AC | weights | AdamW states | saved activations | tensor peak (ratio) "
        "| peak RSS growth (ratio) |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "- weights and AdamW states: summed over the real parameter and optimizer-state tensors.",
        "- saved activations: distinct storages reachable from the loss's autograd graph after a "
        "forward (parameters and buffers excluded).",
        "- tensor peak: maximum over the step of all live tensor bytes, from torch.profiler's "
        "memory timeline (profile_memory, record_shapes, with_stack).",
        "- peak RSS growth: peak resident memory during the measured step minus the RSS before the "
        "model was built (a separate run without the profiler, glibc `MALLOC_MMAP_THRESHOLD_=131072` "
        "so that freed tensors leave RSS); it adds the autograd graph, allocator and Python overhead.",
    ])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
