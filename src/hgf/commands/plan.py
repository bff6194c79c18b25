"""``hgf plan CONFIG --gpus N --gpu-mem 80GB``: parameters, packed sizes and training memory per GPU
under DDP and FSDP2, with and without activation checkpointing (see hgf.plan for the formulas).
Nothing is allocated: the model is built on the meta device."""

from __future__ import annotations

import argparse
import json

from hgf.plan import STRATEGIES, format_plan, make_plan, parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan parameters, packed size and training memory per GPU")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU: 80GB (10^9), 80GiB or 80 (GiB)")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per step (default train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default train.seq_len)")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="the strategy the verdict is for (default dist.strategy, or ddp)")
    p.add_argument("--dtype", choices=("bf16", "fp32"),
                   help="compute dtype (default: bf16 autocast unless train.dtype=float32)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of GPU memory kept free in the fits decision (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from hgf.train.init_from import load_train_config  # init.from: the source's architecture

    cfg = load_train_config(args.config, overrides)
    strategy = args.strategy or (cfg.dist.strategy if cfg.dist.strategy in STRATEGIES else "ddp")
    dtype = args.dtype or ("fp32" if cfg.train.dtype == "float32" else "bf16")
    plan = make_plan(cfg, args.gpus, parse_size(args.gpu_mem), args.micro_batch or cfg.train.batch_size,
                     args.seq_len or cfg.train.seq_len, strategy, dtype == "bf16", args.headroom)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0
