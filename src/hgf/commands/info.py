"""``hgf info CONFIG``: the resolved config, parameters per component and the memory report."""

from __future__ import annotations

import argparse

from hgf.memory import format_report, memory_report
from hgf.model import build_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print the resolved config, parameter counts and memory report")
    p.add_argument("config", help="TOML config file")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from hgf.train.init_from import load_train_config  # init.from: the source's architecture

    cfg = load_train_config(args.config, overrides)
    print(f"# resolved config ({args.config})")
    print(cfg.to_toml())
    model = build_model(cfg, device="meta")
    if cfg.model.linear == "hgf":
        print(f"# HGF correction rank r = {model.rank} on {cfg.hgf.targets} projections\n")
    print(format_report(memory_report(model)))
    return 0
