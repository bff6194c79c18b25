"""``hgf eval RUN_DIR``: the full validation set through a trained run's model.

Prints loss (nats/token), perplexity and bits per byte and writes ``RUN_DIR/eval.json``. The data
is the run's own config (``--data.key=value`` overrides it, e.g. another ``data.path``); the
prepared data must use the run's tokenizer, the one its weights were trained with
(hgf.data.tokenizer: a tokenizer file from another run is refused, not silently used).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from hgf.errors import HGFError

EVAL_FILE = "eval.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="full validation loss, perplexity and bits/byte of a run")
    p.add_argument("run_dir", help="a run directory written by hgf train")
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's train.batch_size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run, takes_overrides=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from hgf.config import build_config, parse_overrides, replace
    from hgf.data import prepare
    from hgf.data.tokenizer import check_tokenizer_file, read_record
    from hgf.runs import MODEL_FILE, TOKENIZER_FILE, atomic_write_text, load_run_config, load_trained
    from hgf.train import autocast_for, evaluate_tokens, resolve_device

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    if overrides:
        over = parse_overrides(overrides)
        if set(over) - {"data"}:
            raise HGFError(f"hgf eval only takes --data.* overrides, got --{next(iter(over))}.*")
        cfg = build_config((cfg.to_dict(), str(run_dir)), (over, "command line"))
    device = resolve_device(args.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model, _ = load_trained(run_dir, device)
    weights, run_tok = run_dir / MODEL_FILE, run_dir / TOKENIZER_FILE
    record = read_record(weights)
    if run_tok.is_file():  # the run's own tokenizer must be the one its weights record
        check_tokenizer_file(run_tok, cfg.model.vocab_size, weights)
    want = _sha256(run_tok) if run_tok.is_file() else record.sha256 if record else None
    prep = prepare(cfg, progress=cfg.train.progress)
    if want is not None and prep.manifest["tokenizer_sha256"] != want:
        if not run_tok.is_file():  # the data config makes another tokenizer than the weights'
            check_tokenizer_file(prep.tokenizer_path, cfg.model.vocab_size, weights)
        # e.g. an imported or converted run whose data section no longer names how its
        # tokenizer was made: tokenize the validation text with the run's own tokenizer file
        print(f"{run_dir}: the data config gives another tokenizer; using {run_tok}")
        cfg = replace(cfg, data={"tokenizer": str(run_tok)})
        prep = prepare(cfg, progress=cfg.train.progress)
        if want != prep.manifest["tokenizer_sha256"]:
            raise HGFError(f"{prep.dir}: prepared with a different tokenizer than {run_tok}")
    bs = args.batch_size or cfg.train.batch_size
    res = evaluate_tokens(model, prep.tokens("valid"), cfg.train.seq_len, bs, device,
                          prep.bytes_per_token("valid"), autocast_for(device, cfg.train.dtype))
    out = {"split": "valid", "data": str(prep.dir), "seq_len": cfg.train.seq_len,
           **res.to_dict()}
    atomic_write_text(run_dir / EVAL_FILE, json.dumps(out, indent=2) + "\n")
    print(f"{run_dir}: validation loss {res.loss:.4f} nats/token, perplexity {res.ppl:.2f}, "
          f"{res.bpb:.4f} bits/byte over {res.tokens:,} tokens -> {run_dir / EVAL_FILE}")
    return 0
