"""The oracle probe: how much of the ternary gap can any low-rank correction recover at all?

Take a trained BitNet run, freeze its whole backbone (ternary weights, norms, embeddings, head),
give every targeted projection a full-precision correction with the gate fixed at g = 1,

    y = T(x) + B(A x)        A ∈ R^{r×d_in} (Kaiming), B ∈ R^{d_out×r} (zeros), only A, B train

and train only A and B on the same data. The loss it reaches, against the BitNet run's own and a
full-precision run's (same data, same size), bounds what a rank-r correction can buy on that
backbone:

    recovery(r) = (L_bitnet − L_oracle(r)) / (L_bitnet − L_fp16)

This is an upper bound for HGF's correction in one sense only (it trains on a finished backbone,
with g = 1 and its own LR), and a lower bound in another (the backbone cannot adapt to it); it
answers "is there anything low-rank left to recover?".

    python -m hgf.reproduce.oracle BITNET_RUN FP16_RUN --ranks 4,8,16,32 --steps 1000 \\
        --out results/why_width/oracle.json

Writes ``oracle.json`` and ``oracle.md`` (rank, targets, steps, overhead, full-validation loss,
bits/byte, recovery). Each finished row is saved at once (``oracle.rows/``), so a killed probe
resumes where it stopped, and two processes started with the same command share the rows (a row
another process is training is skipped; the last to finish writes the table). One row (1000
steps of batch 4 × 128 and a full-validation pass) takes ~7.5 min on one CPU core at the
``small`` size (results/why_width/COMMANDS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from hgf.config import Config, replace
from hgf.data.prepare import prepare
from hgf.errors import HGFError, exit_code
from hgf.memory import memory_report
from hgf.model import build_model, lm_loss
from hgf.model.hgf_linear import CORRECTION_PARAMS
from hgf.runs import (
    MODEL_FILE,
    RunInUseError,
    atomic_write_text,
    load_run_config,
    load_trained,
    run_lock,
)
from hgf.train.batches import BatchSampler
from hgf.train.evaluate import evaluate_tokens
from hgf.train.schedule import Schedule


def oracle_config(cfg: Config, rank: int, targets: str, steps: int, lr: float) -> Config:
    """The BitNet run's config with a rank-r correction (g = 1, raw gate) and the probe's steps."""
    if cfg.model.linear != "bitlinear":
        raise HGFError(f"the oracle probe needs a bitnet run (model.linear = bitlinear), got "
                       f"model.linear = {cfg.model.linear}")
    return replace(cfg, model={"linear": "hgf"},
                   hgf={"rank": rank, "target_overhead": 0.0, "targets": targets, "gate": "raw",
                        "gate_init": 1.0, "fusion": "additive", "init": "kaiming",
                        "gate_warmup_frac": 0.0, "gate_freeze_frac": 1.0, "gate_l2": 0.0},
                   train={"steps": steps, "lr": lr, "warmup_steps": min(50, steps // 10)})


def build_probe(bitnet_run: Path, cfg: Config) -> torch.nn.Module:
    """The HGF model of ``cfg`` holding the BitNet run's weights; only A and B require grad."""
    model = build_model(cfg)
    state = load_trained(bitnet_run)[0].state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k.rsplit(".", 1)[-1] not in CORRECTION_PARAMS]
    if bad or unexpected:
        raise HGFError(f"{bitnet_run / MODEL_FILE}: does not fit the probe model: missing "
                       f"{bad[:3]}, unexpected {list(unexpected)[:3]}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".A", ".B")))
    return model


def train_probe(model: torch.nn.Module, cfg: Config, train_tokens, seed: int) -> float:
    """AdamW on A and B only (no weight decay), the run's batch and schedule; the last loss."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=0.0)
    sched = Schedule(t)
    sampler = BatchSampler(train_tokens, t.batch_size, t.seq_len, seed)
    model.train()
    loss = float("nan")
    for step in range(t.steps):
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step)
        x, y = sampler.next()
        out = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
        opt.step()
        loss = float(out.detach())
    return loss


def final_loss(run: Path) -> float:
    """The full-validation loss a finished run logged (``kind = final`` in metrics.jsonl)."""
    finals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"final"' in line]
    if not finals:
        raise HGFError(f"{run}: no full-validation result in metrics.jsonl (run not finished)")
    return float(finals[-1]["val_loss"])


def rows_dir(out: Path) -> Path:
    """Where the finished rows of an unfinished probe wait (``oracle.rows/`` beside ``oracle.json``),
    one folder per (targets, rank), each locked while a process trains it (:func:`run_lock`)."""
    return out.with_name(out.stem + ".rows")


def _settings(bitnet_run: Path, fp16_run: Path, steps: int, lr: float, seed: int) -> dict:
    return {"bitnet_run": str(bitnet_run), "fp16_run": str(fp16_run), "steps": steps, "lr": lr,
            "seed": seed}


def _same_settings(row: dict, settings: dict, where: Path) -> dict:
    """``row`` when it was made with ``settings``, else a one-line error naming the difference
    (probes written before seeds were recorded used seed 0)."""
    got = {k: row.get(k, 0 if k == "seed" else None) for k in settings}
    if got != settings:
        diff = [f"{k} {got[k]!r} (now {v!r})" for k, v in settings.items() if got[k] != v]
        raise HGFError(f"{where}: a probe row made with other settings ({', '.join(diff)}); "
                       f"remove it or choose another --out")
    return row


def _saved_row(row_dir: Path, settings: dict) -> dict | None:
    """The row a process already finished in ``row_dir``, if any."""
    f = row_dir / "row.json"
    return _same_settings(json.loads(f.read_text()), settings, f) if f.is_file() else None


def probe_row(bitnet_run: Path, base: Config, data, tg: str, r: int, steps: int, lr: float,
              seed: int, l_bitnet: float, l_fp16: float) -> dict:
    """Train one rank-r correction on the frozen backbone and evaluate it on full validation."""
    cfg = oracle_config(base, r, tg, steps, lr)
    torch.manual_seed(seed)
    model = build_probe(bitnet_run, cfg)
    t0 = time.time()
    train_loss = train_probe(model, cfg, data.tokens("train"), seed)
    res = evaluate_tokens(model.eval(), data.tokens("valid"), cfg.train.seq_len,
                          cfg.train.batch_size, torch.device("cpu"), data.bytes_per_token("valid"))
    return {"targets": tg, "rank": r, "steps": steps, "lr": lr,
            "overhead_2bit": memory_report(model).overhead("i2"), "train_loss": train_loss,
            "val_loss": res.loss, "val_bpb": res.bpb,
            "recovery": (l_bitnet - res.loss) / (l_bitnet - l_fp16),
            "wall_s": round(time.time() - t0, 1)}


def run_oracle(bitnet_run: Path, fp16_run: Path, ranks: list[int], targets: list[str],
               steps: int, lr: float, out: Path, seed: int = 0) -> dict:
    """Every (targets, rank) row of the probe, resumable and shareable: rows already in ``out`` or
    in :func:`rows_dir` are kept, a row another process is training is skipped, each finished
    row is saved at once. ``complete`` says whether every row is there."""
    base = load_run_config(bitnet_run)
    data = prepare(base, progress=False)
    l_bitnet, l_fp16 = final_loss(bitnet_run), final_loss(fp16_run)
    settings = _settings(bitnet_run, fp16_run, steps, lr, seed)
    done: dict[tuple[str, int], dict] = {}
    if out.exists():
        prev = json.loads(out.read_text())
        for row in prev.get("rows", []):
            done[row["targets"], row["rank"]] = _same_settings({**prev, **row}, settings, out)
    keys = [(tg, r) for tg in targets for r in ranks]
    rows_dir(out).mkdir(parents=True, exist_ok=True)  # a read-only --out fails now, not after a row
    for tg, r in keys:
        row_dir = rows_dir(out) / f"{tg}-r{r}"
        if (tg, r) in done or (row := _saved_row(row_dir, settings)) is not None:
            done.setdefault((tg, r), row)
            continue
        try:
            with run_lock(row_dir):  # re-read inside: another process may have just finished it
                row = _saved_row(row_dir, settings) or {
                    **probe_row(bitnet_run, base, data, tg, r, steps, lr, seed, l_bitnet, l_fp16),
                    **settings}
                atomic_write_text(row_dir / "row.json", json.dumps(row, indent=1) + "\n")
        except RunInUseError:
            print(f"targets {tg} rank {r}: another process is training it; skipped", flush=True)
            continue
        done[tg, r] = row
        print(f"targets {tg} rank {r}: val {row['val_loss']:.4f} recovery {row['recovery']:+.3f} "
              f"overhead {row['overhead_2bit']:.1%} ({row['wall_s']:.0f} s)", flush=True)
    for tg, r in keys:  # rows other processes finished meanwhile: the last to finish has them all
        if (tg, r) not in done and (row := _saved_row(rows_dir(out) / f"{tg}-r{r}", settings)):
            done[tg, r] = row
    rows = [{k: v for k, v in done[key].items() if k not in ("bitnet_run", "fp16_run", "seed")}
            for key in keys if key in done]
    return {"bitnet_run": str(bitnet_run), "fp16_run": str(fp16_run), "d_model": base.model.d_model,
            "bitnet_val_loss": l_bitnet, "fp16_val_loss": l_fp16, "seed": seed, "rows": rows,
            "complete": len(rows) == len(keys)}


def format_oracle(res: dict) -> str:
    lines = [f"Oracle probe on `{res['bitnet_run']}` (d_model {res['d_model']}): frozen BitNet "
             f"backbone, only a rank-r correction trained (g = 1). L_bitnet = "
             f"{res['bitnet_val_loss']:.4f}, L_fp16 = {res['fp16_val_loss']:.4f} "
             f"(`{res['fp16_run']}`), full validation, nats/token.", "",
             "| targets | rank | overhead (2-bit) | steps | val loss | bits/byte | recovery |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['targets']} | {r['rank']} | {r['overhead_2bit']:.1%} | {r['steps']} | "
                     f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['recovery']:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hgf.reproduce.oracle",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("bitnet_run", type=Path)
    ap.add_argument("fp16_run", type=Path)
    ap.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks")
    ap.add_argument("--targets", default="attention,all", help="comma-separated hgf.targets")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="oracle.json path (oracle.md beside)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return exit_code(lambda: _probe(args))


def _probe(args: argparse.Namespace) -> int:
    """``main``'s body: run the probe's rows, write the table once every row is there."""
    res = run_oracle(args.bitnet_run, args.fp16_run, [int(r) for r in args.ranks.split(",")],
                     args.targets.split(","), args.steps, args.lr, args.out)
    if not res.pop("complete"):
        print(f"{len(res['rows'])} rows done, the others are training in another process; "
              f"rerun this command once they finish to write {args.out}", flush=True)
        return 0
    atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), format_oracle(res))
    shutil.rmtree(rows_dir(args.out), ignore_errors=True)
    print(format_oracle(res))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
