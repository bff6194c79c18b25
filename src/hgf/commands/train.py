"""``hgf train CONFIG [--section.key=value ...]``: train one run end to end (resumes by default
from the latest good checkpoint in train.out_dir; ``--train.resume=never`` refuses to). The same
command runs under ``torchrun --nproc_per_node=N -m hgf train ...`` with ``--dist.strategy=ddp``
or ``fsdp2`` (docs/DISTRIBUTED.md)."""

from __future__ import annotations

import argparse

from hgf.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config (resumable)")
    p.add_argument("config", help="TOML config file, e.g. configs/tinystories/hgf-debug.toml")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from hgf.train import train

    cfg = load_config(args.config, overrides)
    res = train(cfg)
    if res.rank != 0:  # under torchrun, rank 0 reports
        return 0
    msg = f"done: {res.step} steps in {res.run_dir}"
    if res.resumed_from is not None:
        msg += f" (resumed from step {res.resumed_from})"
    if res.final is not None:
        msg += (f"; validation {res.final.loss:.4f} nats/token, ppl {res.final.ppl:.2f}, "
                f"{res.final.bpb:.4f} bits/byte")
    print(msg)
    return 0
