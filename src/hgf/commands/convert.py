"""``hgf convert SRC --to run|hf|bitnet OUT``: run directory <-> Hugging Face folder <-> BitNet.

    hgf convert runs/x --to hf out/x-hf                  # transformers folder (model_type "hgf")
    hgf convert out/x-hf --to run runs/x2                # and back
    hgf convert bitnet-ckpt --from bitnet --to run runs/b [--scale-convention auto|mean|inverse]
                                                         [--model.linear=hgf --hgf.rank=16]
    hgf convert runs/b --to bitnet out/b-bitnet          # transformers BitNetForCausalLM checkpoint
    hgf convert runs/h --to bitnet out/h-bitnet --drop-correction   # HGF: ternary backbone (B := 0)
    hgf convert llama-folder --to run runs/l             # LlamaForCausalLM folder -> dense run
    hgf convert runs/fp --to llama out/fp-llama          # dense run -> LlamaForCausalLM folder
    hgf convert runs/fp --to ptqtp runs/fp-ptqtp [--ptqtp.iterations=50 --ptqtp.tol=1e-4
                                                  --ptqtp.activations=int8|fp]
                                                         # dense run or Llama folder -> two
                                                         # ternary trit-planes per projection
"""

from __future__ import annotations

import argparse

from hgf.hf.bitnet_import import CONVENTIONS
from hgf.hf.convert import SOURCES, TARGETS, convert


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between run folders, Hugging Face folders and "
                       "BitNet checkpoints")
    p.add_argument("src", help="source folder (run, Hugging Face or BitNet checkpoint)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format (bitnet: a transformers "
                   "BitNetForCausalLM checkpoint, packed ternary weights; llama: a transformers "
                   "LlamaForCausalLM folder, dense models only; ptqtp: a run of two fitted ternary "
                   "trit-planes with row scales per projection, from a dense model, no training "
                   "(options --ptqtp.iterations=50, --ptqtp.tol=1e-4, --ptqtp.activations=int8|fp))")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument("--from", dest="fmt", default="auto", choices=("auto",) + SOURCES,
                   help="source format (default: detected from its config.json)")
    p.add_argument("--scale-convention", default="auto", choices=CONVENTIONS,
                   help="BitNet weight_scale: mean = mean|W| (AutoBitLinear), inverse = 1/mean|W| "
                   "(BitLinear), auto = from quantization_config.linear_class or the magnitudes")
    p.add_argument("--drop-correction", action="store_true",
                   help="--to bitnet of an HGF model: prune the low-rank correction (B := 0) and "
                   "export the ternary backbone; prints how much the logits move")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    info = convert(args.src, args.to, args.out, args.fmt, args.scale_convention, overrides,
                   args.drop_correction)
    print(f"converted {args.src} ({info['from']}) -> {args.out} ({info['to']})")
    if "scale_convention" in info:
        print(f"  scale convention: {info['scale_convention']} ({info['reason']}); zero fraction "
              f"{info['zero_fraction']:.3f}; K/V heads repeated x{info['kv_heads_repeated']}")
    if "drift" in info:
        d = info["drift"]
        print(f"  correction dropped (B := 0): on {d['n_tokens']} random tokens max |dlogit| "
              f"{d['max_abs_logit_diff']:.4g}, mean KL {d['mean_kl']:.4g} nats/token, top-1 "
              f"agreement {d['top1_agreement']:.3f}")
    if "ptqtp" in info:
        f = info["ptqtp"]
        print(f"  ptqtp: {f['projections']} projections fitted (rounds: mean {f['mean_rounds']:.1f}, "
              f"max {f['max_rounds']} of {f['iterations']}, tol {f['tol']:g}); mean relative "
              f"error |W-What|^2/|W|^2 {f['mean_rel_error']:.4f} (per-tensor absmean ternary: "
              f"{f['mean_rel_error_absmean']:.4f}); activations {f['activations']}")
    print(f"  tokenizer: {info['tokenizer'] or 'none'}"
          + (f" ({info['tokenizer_note']})" if "tokenizer_note" in info else ""))
    return 0
