"""``hgf train CONFIG_OR_RUN_DIR [--overwrite] [--section.key=value ...]``: train one run end to
end (resumes by default from the latest good checkpoint in train.out_dir; ``--train.resume=never``
refuses to). A run folder instead of a TOML file continues that run with its config.json. The same
command runs under ``torchrun --nproc_per_node=N -m hgf train ...`` with ``--dist.strategy=ddp``
or ``fsdp2`` (docs/DISTRIBUTED.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hgf.config import Config, TrainConfig, build_config, parse_overrides, read_json
from hgf.runs import CONFIG_FILE

_T = TrainConfig()
EPILOG = f"""\
config overrides:
  Any config key can be set on the command line as --section.key=value (or --section.key value),
  over the TOML file: defaults < model.size < the TOML file < the command line. For example
    hgf train configs/hgf.toml --model.size=tiny --train.steps=400 --train.out_dir=runs/mine
  `hgf info CONFIG [--section.key=value ...]` prints the resolved config with every default.
  Some train defaults: train.out_dir (default {_T.out_dir}), train.steps (default {_T.steps}),
  train.resume (default {_T.resume}), train.ckpt_every (default {_T.ckpt_every} = off),
  train.ckpt_minutes (default {_T.ckpt_minutes:g}), train.keep_checkpoints (default {_T.keep_checkpoints}),
  train.schedule_steps (default {_T.schedule_steps} = train.steps).

the run folder (train.out_dir):
  with checkpoints        resumes from the newest good one; a finished run redoes only its final
                          evaluations
  a larger train.steps    extends a finished run from its last checkpoint: the LR and gate
                          schedules stay laid over the old length (recorded as
                          train.schedule_steps), so past the old end the LR holds its final value
                          (cosine: lr x min_lr_frac; two_stage: lr x two_stage_lr_frac; constant:
                          lr); the finished run's checkpoint is kept
  model.safetensors but no checkpoints   refused; --overwrite trains it again from step 0
  only metrics.jsonl      starts from step 0 and says so; the old log is kept as metrics.jsonl.N

from a pretrained model (docs/CONVERT.md):
  --init.from=SOURCE      a run, an hgf or Llama Hugging Face folder: the model's architecture and
                          tokenizer come from it, its weights initialise the model (latent
                          ternary weights = the FP weights; hgf.init=svd|kaiming for A, B;
                          init.subln=identity|ones|off); a resumed run does not re-read it
  --distill.alpha=0.5     distil from init.from (or --distill.teacher=DIR) at
                          --distill.temperature=T: loss = a*T^2*KL(teacher||student) + (1-a)*CE

checkpoints:
  every train.ckpt_every steps, every train.ckpt_minutes minutes, at the end, and after SIGINT
  (Ctrl-C) or SIGTERM: the run checkpoints at the next step boundary and exits with 130 / 143
  (a second signal stops at once). Run the same command again to resume exactly.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model from a TOML config (resumable)", epilog=EPILOG,
        formatter_class=_Formatter,
        usage="%(prog)s [-h] [--overwrite] CONFIG_OR_RUN_DIR [--section.key=value ...]",
        description="Train one run end to end into train.out_dir, resuming from its latest "
        "good checkpoint.")
    p.add_argument("config", metavar="CONFIG_OR_RUN_DIR",
                   help="a TOML config file, e.g. configs/tinystories/hgf-debug.toml, or a run "
                   "folder: continue that run with its config.json (train.out_dir = the folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 even if train.out_dir holds a run, deleting its "
                   "checkpoints/, model.safetensors, metrics.jsonl and tb/")
    p.set_defaults(func=run, takes_overrides=True)


def run_config(path: str | Path, overrides: list[str]) -> Config:
    """The config of a TOML file, or of a run folder (its config.json, out_dir = the folder),
    with ``--section.key=value`` overrides on top."""
    path = Path(path)
    if not path.is_dir():  # init.from: the source's architecture (hgf.train.init_from)
        from hgf.train.init_from import load_train_config

        return load_train_config(path, overrides)
    stored = read_json(path / CONFIG_FILE, "not a run folder (config.json missing)")
    return build_config((stored, str(path / CONFIG_FILE)),
                        ({"train": {"out_dir": str(path)}}, "run folder"),
                        (parse_overrides(overrides), "command line"))


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from hgf.train import train
    from hgf.train.guard import TrainingInterrupted

    cfg = run_config(args.config, overrides)
    try:
        res = train(cfg, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
            print(f"hgf: {e}", file=sys.stderr)
        return 128 + e.signum
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
