"""Peak RSS per rank of building a preset for FSDP2 on CPU (gloo), by two paths:

    eager  the old path: every rank builds and initialises the whole model on the CPU
           (``build_model(cfg, "cpu")``), then ``parallelize`` shards it
    meta   ``hgf.parallel.build_parallel``: built on the meta device, sharded, then materialised
           (``to_empty``) and initialised (``init_weights``) rank by rank

against ``hgf plan``'s FSDP2 weights per rank (4P/N bytes; float32, no optimizer: only the model
is built here, no training step). Usage (appends nothing; paste the table where it belongs):

    PYTHONPATH=src python scripts/build_rss.py configs/scale/hgf-1b.toml [--nproc 2]
        [--paths eager,meta]

Each path runs as ``torchrun --nproc_per_node=N scripts/build_rss.py --worker PATH CONFIG``; every
rank reports ``ru_maxrss`` (the process's peak resident set) before and after the build, the
bytes of its own parameter parts, and a float64 checksum of them (equal between the paths: the
same weights).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB, GIB = 2**20, 2**30
TAG = "BUILD_RSS "


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(path: str, config: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from hgf.config import load_config
    from hgf.model import build_model
    from hgf.parallel import build_parallel, parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(config, ["--dist.strategy=fsdp2", "--train.compile=false"])
    cpu = torch.device("cpu")
    before = _maxrss()
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    if path == "eager":
        model = build_model(cfg, cpu)
        parallelize(model, cfg, cpu)
    else:
        model, _ = build_parallel(cfg, cpu)
    seconds = time.perf_counter() - start
    peak = _maxrss()
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    row = {"rank": dist.get_rank(), "path": path, "before": before, "peak": peak,
           "seconds": seconds, "local_bytes": sum(t.numel() * t.element_size() for t in local),
           "checksum": sum(float(t.sum(dtype=torch.float64)) for t in local)}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(TAG + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def run(path: str, config: str, nproc: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port}", __file__, "--worker", path, config]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{path}: torchrun failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith(TAG))
    return json.loads(line[len(TAG):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--paths", default="eager,meta")
    ap.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.config)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from hgf.config import load_config
    from hgf.plan import make_plan

    cfg = load_config(a.config)
    plan = make_plan(cfg, a.nproc, 80 * GIB, cfg.train.batch_size, cfg.train.seq_len,
                     strategy="fsdp2", autocast=False)
    planned = plan.memory["fsdp2"].weights
    print(f"{a.config}: {plan.report.total_params / 1e9:.3f}B parameters, {a.nproc} ranks; "
          f"hgf plan FSDP2 weights per rank {planned / MIB:.0f} MiB "
          f"(whole model {plan.memory['single'].weights / MIB:.0f} MiB)")
    print("| path | rank | RSS before build (MiB) | peak RSS (MiB) | peak growth (MiB) | growth / "
          "planned | own parameter bytes (MiB) | build s | checksum |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in a.paths.split(","):
        for r in run(path, a.config, a.nproc):
            grown = r["peak"] - r["before"]
            print(f"| {path} | {r['rank']} | {r['before'] / MIB:.0f} | {r['peak'] / MIB:.0f} | "
                  f"{grown / MIB:.0f} | {grown / planned:.2f} | {r['local_bytes'] / MIB:.0f} | "
                  f"{r['seconds']:.1f} | {r['checksum']:.9g} |", flush=True)


if __name__ == "__main__":
    main()
