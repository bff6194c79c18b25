"""``hgf data prepare CONFIG`` tokenizes the dataset into the cache; ``hgf data info DIR`` describes it."""

from __future__ import annotations

import argparse
import time

from hgf.data import Prepared, load_prepared, prepare
from hgf.data.sources import SPLITS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare and inspect tokenized datasets")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    pp = actions.add_parser("prepare", help="tokenize data.path (or download) into data.cache_dir")
    pp.add_argument("config", help="TOML config file")
    pp.set_defaults(func=run_prepare, takes_overrides=True)
    pi = actions.add_parser("info", help="print the manifest summary of a prepared data folder")
    pi.add_argument("dir", help="prepared data folder (<data.cache_dir>/<key>)")
    pi.set_defaults(func=run_info)


def run_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from hgf.train.init_from import load_train_config  # init.from: the source's architecture

    cfg = load_train_config(args.config, overrides)
    t0 = time.perf_counter()
    p = prepare(cfg, progress=cfg.train.progress)
    how = "built" if p.built else "cached"
    print(f"{p.dir}  ({how} in {time.perf_counter() - t0:.1f} s)")
    print(summary(p))
    return 0


def run_info(args: argparse.Namespace, overrides: list[str]) -> int:
    p = load_prepared(args.dir)
    print(p.dir)
    print(summary(p))
    return 0


def summary(p: Prepared) -> str:
    m = p.manifest
    lines = [f"tokenizer {m['tokenizer_spec']} ({m['tokenizer_kind']}): vocab {p.vocab_size}, "
             f"eot id {p.eot_id}, {m['dtype']} tokens",
             f"{'split':<6} {'stories':>9} {'tokens':>11} {'text bytes':>12} {'bytes/token':>11}"]
    for s in SPLITS:
        x = m["splits"][s]
        lines.append(f"{s:<6} {x['stories']:>9,} {x['tokens']:>11,} {x['text_bytes']:>12,} "
                     f"{p.bytes_per_token(s):>11.3f}")
    return "\n".join(lines)
