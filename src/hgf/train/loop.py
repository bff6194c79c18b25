"""The training loop: ``forward_backward_step`` → ``train_step`` → ``train``.

One update (``step`` = 0-based index of the update, ``k`` = train.grad_accum micro-batches):
    set LR/WD (schedule.py) and the gate clamp / freeze (gates.py)
    for each micro-batch:  L_i = CE(model(x_i), y_i) [+ gate L2 penalty];  backward(L_i / k)
                           (with distill.alpha > 0, L_i = α·T²·KD + (1 − α)·CE, see distill.py)
    stop with an HGFError if the loss or the gradient norm is not finite (no update is applied)
    clip the global gradient norm to train.grad_clip (0 = off), AdamW step
Autocast: bf16 on CUDA, float32 on CPU (train.dtype = auto). The model is built on the meta device
by :func:`hgf.parallel.build_parallel`, which shards it (FSDP2) before allocating and initialising
it, and applies checkpointing, compile and DDP/FSDP2 (:func:`hgf.parallel.parallelize`); its
weights are those of a model built eagerly on one device, bit for bit. Under torchrun
every rank runs this loop on its slice of the global batch: gradients are averaged over the ranks
on the last micro-batch only, the logged loss is the mean over the ranks, logging and file writes
happen on rank 0 (sharded checkpoints are written by every rank, see checkpoint.py).

The run folder (train.out_dir) is never replaced silently. At start-up:
    checkpoints      resume from the newest good one (train.resume=auto; never: refused); a larger
                     train.steps extends a finished run (the schedules keep their length, see
                     checkpoint.py), which is said on stderr with the LR past the old end
    model.safetensors but no checkpoint   refused: a finished run whose checkpoints are gone
    only metrics.jsonl                    start from step 0, said on stderr; the old log is kept
                                          as metrics.jsonl.N
    overwrite=True (hgf train --overwrite) start from step 0, deleting the folder's checkpoints/,
                     model.safetensors, metrics.jsonl and tb/
A run that starts from step 0 with ``init.from`` set initialises the built (and, under FSDP2,
sharded) model from that source (init_from.py); a resumed run never reads the source again.
Checkpoints are written every train.ckpt_every steps, every train.ckpt_minutes minutes, at the end
and at the step boundary after a SIGINT/SIGTERM (then TrainingInterrupted, see guard.py). Before
the first step a line warns when ``hgf plan``'s memory estimate exceeds the memory available.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from hgf.config import Config
from hgf.data import Prepared, prepare
from hgf.data.tokenizer import tokenizer_metadata
from hgf.errors import HGFError
from hgf.model import gate_ranges, gate_values, lm_loss
from hgf.model.sherry import arenas_at, set_arenas
from hgf.parallel import (
    all_mean,
    barrier,
    build_parallel,
    clip_grad_norm_,
    gradient_sync,
    is_main_process,
    process_group,
    sync_replicated_grads,
    world,
)
from hgf.parallel.state import export_weights
from hgf.runs import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, run_lock, save_config
from hgf.train import guard
from hgf.train.batches import BatchSampler
from hgf.train.checkpoint import (
    CKPT_DIR,
    STATE_FILE,
    Checkpointer,
    check_resumable_config,
    load_checkpoint,
    step_name,
)
from hgf.train.device import Autocast, autocast_for, gemm_context, resolve_device
from hgf.train.diagnostics import TernaryDiagnostics
from hgf.train.distill import Distiller, build_distiller
from hgf.train.evaluate import EvalResult, evaluate_tokens
from hgf.train.gates import GateSchedule
from hgf.train.guard import StopSignal, TrainingInterrupted
from hgf.train.init_from import model_initialiser
from hgf.train.metrics import METRICS_FILE, MetricsLogger, Progress, read_metrics
from hgf.train.optim import build_optimizer
from hgf.train.runinfo import write_run_info
from hgf.train.schedule import Schedule


class NonFiniteError(HGFError):
    """The loss or gradient norm of a step was NaN/Inf."""


def forward_backward_step(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, *, scale: float = 1.0, autocast: Autocast = contextlib.nullcontext,
                          penalty: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Backpropagate ``scale · (CE + penalty)`` for one micro-batch; return the detached CE."""
    with autocast():
        logits = model(x)
    loss = lm_loss(logits, y)
    extra = penalty() if penalty is not None else None
    total = loss if extra is None else loss + extra
    (total * scale).backward()
    return loss.detach()


@dataclass
class StepStats:
    loss: float  # cross entropy
    grad_norm: float
    lr: float
    kd: float | None = None  # distillation KL term (hgf.train.distill), None without a teacher


@dataclass
class Trainer:
    """The objects one update needs; built by :func:`train` (or by a benchmark/test directly)."""

    cfg: Config
    model: nn.Module  # the model (parameters, gates, checkpoints; sharded in place by FSDP2)
    forward: Callable[[torch.Tensor], torch.Tensor]  # what build_parallel returned
    optimizer: Optimizer
    sampler: BatchSampler
    device: torch.device
    autocast: Autocast = contextlib.nullcontext
    distiller: Distiller | None = None  # distill.alpha > 0: the frozen teacher
    gemms: Autocast = contextlib.nullcontext  # around forward and backward (device.gemm_context)
    schedule: Schedule = field(init=False)
    gates: GateSchedule = field(init=False)

    def __post_init__(self) -> None:
        self.schedule = Schedule(self.cfg.train)
        self.gates = GateSchedule(self.cfg)

    def train_step(self, step: int) -> StepStats:
        t = self.cfg.train
        lr = self.schedule.apply(self.optimizer, step)
        self.gates.apply(self.model, self.optimizer, step)
        if self.cfg.model.linear == "sherry":  # the Arenas residual's ε for this step
            sh = self.cfg.sherry
            set_arenas(self.model, arenas_at(step, self.cfg.train.schedule_length, sh.arenas_max,
                                             sh.arenas_warmup_frac, sh.arenas_end_frac))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, device=self.device)  # CE, KD (0 without distillation)
        for i in range(t.grad_accum):
            x, y = self.sampler.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            kw = dict(scale=1.0 / t.grad_accum, autocast=self.autocast,
                      penalty=lambda: self.gates.penalty(self.model))
            with gradient_sync(self.forward, sync=i == t.grad_accum - 1), self.gemms():
                if self.distiller is None:
                    loss_sum[0] += forward_backward_step(self.forward, x, y, **kw)
                else:
                    loss_sum += torch.stack(self.distiller.forward_backward(self.forward, x, y,
                                                                            **kw))
        sync_replicated_grads(self.forward)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        mean_loss = all_mean(loss_sum / t.grad_accum)  # over the ranks: the global batch's loss
        loss, kd, grad_norm = torch.cat([mean_loss, norm.float().reshape(1)]).tolist()
        if not np.isfinite(loss + kd) or not np.isfinite(grad_norm):
            what = "loss" if not np.isfinite(loss + kd) else "gradient norm"
            value = (loss if np.isfinite(kd) else kd) if what == "loss" else grad_norm
            raise NonFiniteError(f"non-finite {what} ({value}) at step {step + 1}")
        self.optimizer.step()
        return StepStats(loss=loss, grad_norm=grad_norm, lr=lr,
                         kd=kd if self.distiller is not None else None)


@dataclass
class RunResult:
    run_dir: Path
    step: int  # optimizer updates done
    losses: dict[int, float]  # step -> training loss, for the steps this process ran
    resumed_from: int | None
    val: EvalResult | None  # fixed validation subset after the last step
    final: EvalResult | None  # full validation set (eval.full_at_end)
    rank: int = 0  # this process's rank (the run's results are the same on every rank)


def _prepare(cfg: Config, progress: bool) -> Prepared:
    """Rank 0 prepares (and caches) the data first; the other ranks then read its cache."""
    if not is_main_process():
        barrier()
    data = prepare(cfg, progress=progress)
    if is_main_process():
        barrier()
    return data


def build_trainer(cfg: Config, train_tokens: np.ndarray, device: torch.device,
                  init: Callable[[nn.Module], object] | None = None) -> Trainer:
    """Seeded model, optimizer and sampler for ``cfg`` on ``device`` (not yet resumed); ``init``
    (init.from, see hgf.train.init_from) changes the built model's weights (sharded under
    FSDP2, before DDP's broadcast); with distill.alpha > 0 the trainer gets its teacher."""
    t, w = cfg.train, world()
    torch.manual_seed(t.seed)
    model, forward = build_parallel(cfg, device, init)  # meta → shard → materialise, compiled
    sampler = BatchSampler(train_tokens, t.batch_size, t.seq_len, t.seed, w.rank, w.world_size)
    return Trainer(cfg, model, forward, build_optimizer(model, cfg), sampler, device,
                   autocast_for(device, t.dtype), build_distiller(cfg, device),
                   gemm_context(device, t.dtype))


def _note(msg: str) -> None:
    print(f"hgf: {msg}", file=sys.stderr, flush=True)


def _resume_point(cfg: Config, ckpt: Checkpointer, overwrite: bool) -> tuple[Config, Path | None]:
    """The checkpoint to resume from (None: start from step 0) and ``cfg`` ready for it."""
    run_dir = ckpt.dir.parent
    if overwrite:
        return cfg, None
    if not ckpt.checkpoints():
        if (run_dir / MODEL_FILE).is_file():
            raise HGFError(f"{run_dir} holds a finished run ({MODEL_FILE}) but no checkpoint to "
                           "continue it from; hgf train --overwrite trains it again from step 0, "
                           "replacing it, or choose another train.out_dir")
        return cfg, None
    if cfg.train.resume == "never":
        raise HGFError(f"{ckpt.dir.parent} already holds checkpoints and train.resume=never; "
                       "choose another train.out_dir (or hgf train --overwrite to replace it)")
    path = ckpt.find_resumable()
    if path is not None:
        step = int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
        cfg = check_resumable_config(cfg, path / CONFIG_FILE, world().world_size, step)
    return cfg, path


OVERWRITTEN = (CKPT_DIR, MODEL_FILE, METRICS_FILE, "tb")  # what --overwrite deletes


def _clear_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Before a run that starts from step 0 in ``run_dir`` (rank 0): delete what ``overwrite``
    replaces, or keep an old metrics.jsonl aside as metrics.jsonl.N, saying so."""
    if overwrite:
        gone = []
        for name in OVERWRITTEN:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            gone.append(name)
        if gone:
            _note(f"--overwrite: deleted {', '.join(gone)} in {run_dir}; training from step 0")
        return
    log = run_dir / METRICS_FILE
    if not log.is_file() or log.stat().st_size == 0:
        return
    try:
        steps = [r.get("step", 0) for r in read_metrics(run_dir)]
        last = f" (up to step {max(steps)})" if steps else ""
    except HGFError:
        last = ""
    n = 1
    while log.with_name(f"{METRICS_FILE}.{n}").exists():
        n += 1
    log.rename(log.with_name(f"{METRICS_FILE}.{n}"))
    _note(f"warning: {run_dir} holds {METRICS_FILE}{last} but no checkpoint: starting from "
          f"step 0; the old log is kept as {METRICS_FILE}.{n}")


_FINAL_LR = {"cosine": "lr × min_lr_frac", "constant": "lr",
             "two_stage": "lr × two_stage_lr_frac, weight decay 0"}


def _past_schedule_note(cfg: Config, start: int, resumed: bool, run_dir: Path) -> str | None:
    """What the LR does on the steps past the schedule's length (an extended run)."""
    t = cfg.train
    length = t.schedule_length
    if t.steps <= length or start >= t.steps:
        return None
    if resumed and start == length:
        head = f"continuing the finished {length}-step run to {t.steps} steps"
    else:
        head = f"train.steps={t.steps} runs past the schedule's {length} steps"
    msg = (f"{head}: the LR and gate schedules stay laid over {length} steps "
           f"(train.schedule_steps), so from step {max(length, start) + 1} on the LR holds its "
           f"final value {Schedule(t).final_lr:.3g} ({_FINAL_LR[t.schedule]})")
    if resumed and start == length and (run_dir / MODEL_FILE).is_file():
        msg += f"; {MODEL_FILE} is replaced at the end, {CKPT_DIR}/{step_name(length)} is kept"
    return msg


def _any_rank(*flags: bool, device: torch.device) -> list[bool]:
    """Each flag true on some rank (one collective); the flags themselves in one process."""
    if world().world_size == 1:
        return list(flags)
    x = all_mean(torch.tensor([float(f) for f in flags], device=device))
    return [bool(v > 0) for v in x.tolist()]


def _start_run_dir(cfg: Config, run_dir: Path, data: Prepared, device: torch.device,
                   resumed_from: int | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    write_run_info(run_dir, cfg, device, resumed_from)
    if data.tokenizer_path and Path(data.tokenizer_path).is_file():
        shutil.copyfile(data.tokenizer_path, run_dir / TOKENIZER_FILE)


def train(cfg: Config, data: Prepared | None = None, *, overwrite: bool = False) -> RunResult:
    """Train ``cfg`` end to end into ``cfg.train.out_dir``; with ``train.resume = auto`` continue
    from the run's latest good checkpoint (module docstring: what a folder that holds a run does).
    ``overwrite`` starts from step 0 whatever the folder holds, deleting its previous run. ``data``
    defaults to ``hgf.data.prepare(cfg)``. Under torchrun (``dist.strategy`` ddp/fsdp2) every rank
    calls this; see :mod:`hgf.parallel`. A SIGINT/SIGTERM raises :class:`TrainingInterrupted`
    after a checkpoint."""
    if cfg.model.linear == "ptqtp":  # zero planes until a conversion loads them
        raise HGFError("model.linear=ptqtp has no trainable projections: it is made from a trained "
                       "FP model by `hgf convert SRC --to ptqtp OUT` (evaluate it with `hgf eval`)")
    with process_group(cfg, resolve_device(cfg.train.device)) as device, \
            run_lock(cfg.train.out_dir, enabled=is_main_process()):
        return _train(cfg, data, device, overwrite)


def _train(cfg: Config, data: Prepared | None, device: torch.device,
           overwrite: bool) -> RunResult:
    main = is_main_process()
    run_dir = Path(cfg.train.out_dir)
    ckpt = Checkpointer(run_dir, cfg.train.keep_checkpoints, enabled=main)
    cfg, resume_path = _resume_point(cfg, ckpt, overwrite)
    t, ev = cfg.train, cfg.eval
    data = data if data is not None else _prepare(cfg, progress=t.progress and main)
    if data.vocab_size > cfg.model.vocab_size:
        raise HGFError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                       f"vocabulary ({data.vocab_size}); set --model.vocab_size={data.vocab_size}")
    if t.threads:
        torch.set_num_threads(t.threads)
    if main and (warning := guard.memory_warning(cfg, device)):
        _note(f"warning: {warning}")
    init = None  # a resumed run restores its checkpoint and never re-reads init.from
    if resume_path is None:
        init = model_initialiser(cfg, data.tokens("train"), device, note=main)
    tr = build_trainer(cfg, data.tokens("train"), device, init)
    if main and tr.gemms is not contextlib.nullcontext:
        _note("this CPU has no native bf16 matrix products: bf16 GEMMs run in float32 from bf16 "
              "inputs, rounded back (hgf.train.device)"
              + ("; train.compile does not apply under it (runs eagerly)" if t.compile else ""))
    model, diagnostics = tr.model, TernaryDiagnostics()
    start = 0
    if resume_path is not None:
        start = load_checkpoint(resume_path, model, tr.optimizer, tr.sampler, diagnostics, device)
    resumed_from = start if resume_path is not None else None

    if main:
        if resume_path is None:
            _clear_run_dir(run_dir, overwrite)
        if note := _past_schedule_note(cfg, start, resume_path is not None, run_dir):
            _note(note)
    logger = MetricsLogger(run_dir, enabled=main, tensorboard=t.tensorboard)
    if main:
        _start_run_dir(cfg, run_dir, data, device, resumed_from)
        # the end-of-run evaluations follow the last checkpoint: a finished run redoes them
        logger.truncate_after(start, ("eval", "final") if start == t.steps else ())
    valid, bpt = data.tokens("valid"), data.bytes_per_token("valid")

    def validate(step: int) -> EvalResult:
        res = evaluate_tokens(model, valid, t.seq_len, t.batch_size, device, bpt, tr.autocast,
                              max_windows=ev.batches * t.batch_size * world().world_size)
        logger.log({"kind": "eval", "step": step, **res.to_dict(), **diagnostics(model)})
        return res

    def save(step: int) -> None:
        nonlocal last_saved, saved_at
        ckpt.save(step, cfg, model, tr.optimizer, tr.sampler, diagnostics)
        last_saved, saved_at = step, time.monotonic()

    def stopped(step: int) -> TrainingInterrupted:
        signum = stop.signum or signal.SIGTERM  # another rank caught it
        return TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint "
            f"{ckpt.dir / step_name(step)} written; run the same command to resume", signum)

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world().world_size
    progress = Progress(t.steps, start, enabled=t.progress and main)
    losses: dict[int, float] = {}
    last_saved, saved_at = resumed_from, time.monotonic()
    stop = StopSignal()
    try:
        if start == 0:
            diagnostics(model)  # the reference snapshot of the first flip rate
        stop.install()
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            try:
                stats = tr.train_step(step)
            except NonFiniteError as e:
                good = ckpt.dir / step_name(last_saved) if last_saved else "none"
                raise NonFiniteError(f"{e}; run stopped, last good checkpoint: {good}") from None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tok_s = tokens_per_step / (time.perf_counter() - t0)
            done = step + 1
            losses[done] = stats.loss
            progress.update(stats.loss, tok_s)
            if done % max(t.log_every, 1) == 0 or done == t.steps:
                record = {"kind": "train", "step": done, "loss": stats.loss, "lr": stats.lr,
                          "grad_norm": stats.grad_norm, "tokens_per_s": tok_s}
                if tr.distiller is not None:
                    record |= tr.distiller.record(stats.loss, stats.kd)
                gates = gate_values(model)
                if gates:
                    record["gates"] = gates
                    record |= {"gate_range": r} if (r := gate_ranges(model)) else {}
                logger.log(record)
            if ev.every and done % ev.every == 0 and done < t.steps:
                validate(done)
            timely = t.ckpt_minutes > 0 and time.monotonic() - saved_at >= 60 * t.ckpt_minutes
            timely, stopping = _any_rank(timely, stop.signum is not None, device=device)
            if timely or stopping or (t.ckpt_every and done % t.ckpt_every == 0):
                save(done)
            if stopping:
                raise stopped(done)
        if last_saved != t.steps:
            save(t.steps)
        if _any_rank(stop.signum is not None, device=device)[0]:  # during the last save
            raise stopped(t.steps)
        stop.restore()  # from here on a signal interrupts at once, as before
        val, final = validate(t.steps), None
        if ev.full_at_end:
            final = evaluate_tokens(model, valid, t.seq_len, t.batch_size, device, bpt,
                                    tr.autocast)
            logger.log({"kind": "final", "step": t.steps, **final.to_dict()})
            if main:
                progress.write(f"full validation: loss {final.loss:.4f} nats/token, "
                               f"ppl {final.ppl:.2f}, {final.bpb:.4f} bits/byte")
        export_weights(model, run_dir / MODEL_FILE,  # records the tokenizer (hgf.data.tokenizer)
                       metadata={"step": str(t.steps), **tokenizer_metadata(data.tokenizer_path)})
    finally:
        stop.restore()
        progress.close()
        logger.close()
    return RunResult(run_dir, t.steps, losses, resumed_from, val, final, world().rank)
