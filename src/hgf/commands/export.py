"""``hgf export RUN_DIR -o FILE``: pack a trained run into one self-contained file and print what
it holds, by component, with the correction overhead measured from the file's own tensors.
``-o FOLDER`` writes ``FOLDER/<run name>.hgf``. An existing file is replaced only with ``--force``,
and a file of the run itself never."""

from __future__ import annotations

import argparse

from hgf.errors import HGFError
from hgf.infer.export import export_run, format_breakdown
from hgf.infer.format import EMBEDDINGS, read_header
from hgf.kernels import PACKINGS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="pack a trained run into a ternary inference file")
    p.add_argument("run_dir", help="run directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("-o", "--output", required=True,
                   help="packed file to write (e.g. model.hgf), or a folder: FOLDER/<run name>.hgf")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output file (never one inside RUN_DIR)")
    p.add_argument("--packing", choices=PACKINGS, default=None,
                   help="ternary packing: i2 = 2 bits/weight, tq1 = 1.6 bits/weight, sherry = "
                        "1.25 bits/weight (3:4 sparse, model.linear=sherry only); default sherry "
                        "for a sherry run, else i2")
    p.add_argument("--embeddings", choices=EMBEDDINGS, default="fp16",
                   help="embeddings/LM head storage: fp16, or int8 with one scale per row")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer JSON to store in the file (default RUN_DIR/tokenizer.json)")
    p.add_argument("--format", choices=("hgf", "gguf"), default=None,
                   help="hgf packed file or llama.cpp GGUF (default: from the extension, .gguf)")
    p.add_argument("--lora", action="store_true",
                   help="gguf, HGF run: write only the correction, as a GGUF LoRA adapter")
    p.add_argument("--drop-correction", action="store_true",
                   help="gguf, HGF run: write the ternary backbone only (B := 0), no adapter")
    p.set_defaults(func=run, takes_overrides=False)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.packing is None:  # the packing made for the run's sparsity (sherry: 3:4), else i2
        from hgf.kernels.packing import PACKING_REGISTRY
        from hgf.memory import report_for_config
        from hgf.runs import load_run_config

        sparsity = report_for_config(load_run_config(args.run_dir)).sparsity
        args.packing = next((p for p in PACKINGS if sparsity is not None
                             and PACKING_REGISTRY[p].sparsity == sparsity), "i2")
    if (args.format or ("gguf" if args.output.endswith(".gguf") else "hgf")) == "gguf":
        from hgf.gguf.export import export_run_gguf, format_export

        info = export_run_gguf(args.run_dir, args.output, args.packing, args.embeddings,
                               args.tokenizer, args.lora, args.drop_correction, args.force)
        print(format_export(info, args.packing))
        return 0
    if args.lora or args.drop_correction:
        raise HGFError("--lora and --drop-correction apply to GGUF outputs (.gguf or --format gguf)")
    out = export_run(args.run_dir, args.output, args.packing, args.embeddings, args.tokenizer,
                     args.force)
    header = read_header(out)
    print(format_breakdown(header))
    if header.tokenizer_json is None:
        print("note: no tokenizer stored (the run has none; pass --tokenizer to add one)")
    return 0
