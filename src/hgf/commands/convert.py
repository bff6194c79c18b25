"""``hgf convert SRC --to run|hf OUT``: run directory <-> Hugging Face folder; BitNet -> hgf.

    hgf convert runs/x --to hf out/x-hf                  # transformers folder (model_type "hgf")
    hgf convert out/x-hf --to run runs/x2                # and back
    hgf convert bitnet-ckpt --from bitnet --to run runs/b [--scale-convention auto|mean|inverse]
                                                         [--model.linear=hgf --hgf.rank=16]
"""

from __future__ import annotations

import argparse

from hgf.hf.bitnet_import import CONVENTIONS
from hgf.hf.convert import SOURCES, TARGETS, convert


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between run folders, Hugging Face folders and "
                       "BitNet checkpoints")
    p.add_argument("src", help="source folder (run, Hugging Face or BitNet checkpoint)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument("--from", dest="fmt", default="auto", choices=("auto",) + SOURCES,
                   help="source format (default: detected from its config.json)")
    p.add_argument("--scale-convention", default="auto", choices=CONVENTIONS,
                   help="BitNet weight_scale: mean = mean|W| (AutoBitLinear), inverse = 1/mean|W| "
                   "(BitLinear), auto = from quantization_config.linear_class or the magnitudes")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    info = convert(args.src, args.to, args.out, args.fmt, args.scale_convention, overrides)
    print(f"converted {args.src} ({info['from']}) -> {args.out} ({info['to']})")
    if "scale_convention" in info:
        print(f"  scale convention: {info['scale_convention']} ({info['reason']}); zero fraction "
              f"{info['zero_fraction']:.3f}; K/V heads repeated x{info['kv_heads_repeated']}")
    print(f"  tokenizer: {info['tokenizer'] or 'none'}")
    return 0
