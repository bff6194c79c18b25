"""``hgf bench {train,infer}``: benchmarks, one subcommand each. To add one, write a
``_register_<name>(subparsers)`` function and list it in ``BENCHES``."""

from __future__ import annotations

import argparse

from hgf.errors import HGFError


def _register_train(sub: argparse._SubParsersAction) -> None:
    from hgf.config import ARMS

    p = sub.add_parser("train", help="training step time and tokens/s of every arm at one size")
    p.add_argument("--size", default="tiny", help="model size of every arm (default: tiny)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (configs/<arm>.toml)")
    p.add_argument("--config-dir", default="configs", help="folder with the arm presets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--dtypes", default="",
                   help="comma-separated train.dtype values, one row per arm and dtype: float32, "
                        "bfloat16, bfloat16-aten (bf16 without the float32-GEMM fallback of "
                        "CPUs with no native bf16 GEMM); default: the arm's train.dtype")
    p.set_defaults(func=_run_train, takes_overrides=True)


def _run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from hgf.train.bench import bench_train, format_table, machine_line

    if args.steps <= 0 or args.warmup < 0:
        raise HGFError("--steps must be > 0 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    rows = bench_train(arms, args.config_dir, args.size, args.batch_size, args.seq_len,
                       args.steps, args.warmup, args.device, overrides,
                       [d for d in args.dtypes.split(",") if d] or None)
    print(f"# hgf bench train: size {args.size}, batch {args.batch_size} x seq {args.seq_len}, "
          f"median of {args.steps} steps after {args.warmup} warmup")
    print(f"# {machine_line(args.device)}")
    print(format_table(rows))
    return 0


def _register_infer(sub: argparse._SubParsersAction) -> None:
    from hgf.infer import bench

    p = sub.add_parser("infer", help="packed GEMV and decode vs dense, with memory, as ratios")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run, takes_overrides=False)


BENCHES = [_register_train, _register_infer]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (train, infer)")
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for add in BENCHES:
        add(bench_sub)
