"""Resumable checkpoints: safetensors tensors plus a JSON state file, no pickle.

Layout (``RUN_DIR/checkpoints/``)::

    step_0000400/
        model.safetensors   model weights (tied weights once)
        train.safetensors   optimizer state  ``optim.<param index>.<key>``, RNG states
                            ``rng.torch`` / ``rng.cuda``, diagnostics snapshots ``diag.<layer>``
        config.json         the resolved config
        state.json          format/version, step, batch-sampler state, optimizer group layout,
                            byte size and sha256 of every file above (checked before loading),
                            ``"final": true`` at the end of a run (step = its train.steps)
    latest                  the name of the newest complete checkpoint (written atomically)

A sharded (FSDP2) model is saved collectively, in the same folder layout except that model and
optimizer state live in ``dcp/`` (torch.distributed.checkpoint: one file of shards per rank plus
``.metadata``, keyed by parameter name) instead of model.safetensors and the ``optim.*`` tensors;
state.json then says ``"layout": "dcp"``. Runs with more than one process record
``"world_size"``. Any checkpoint resumes under any number of processes as long as the global
batch ``train.batch_size × processes`` is the same (the batch sampler then draws the same rows):
a DCP checkpoint reshards on load, a single-process one is scattered into FSDP2 shards.

A checkpoint is written into a temporary folder and renamed into place, so a crash leaves either
the previous checkpoints or the complete new one. Only the last ``train.keep_checkpoints`` are
kept, and every end-of-run checkpoint: extending a finished run never prunes the finished one. On
resume an unusable checkpoint (truncated, corrupt, hash mismatch) is skipped with a warning and the
next older one is used; if none is usable that is an HGFError.

A checkpoint resumes under a config that differs only in :data:`RESUME_FREE` keys, the batch split
(see above) and ``train.steps``: any value from the checkpoint's step up. The LR/WD and gate
schedules keep the checkpoint's length (``train.schedule_length``): an unset
``train.schedule_steps`` takes it over, so a finished run extended to more steps holds the
schedules' final values past its old end (schedule.py) and its config.json says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.optim import Optimizer

from hgf.config import Config, load_config_json, replace
from hgf.errors import HGFError
from hgf.parallel import barrier, broadcast_object, is_sharded, world
from hgf.parallel.state import load_dcp, load_full, save_dcp
from hgf.runs import MODEL_FILE, atomic_write_text, load_weights, save_config
from hgf.train.batches import BatchSampler
from hgf.train.diagnostics import TernaryDiagnostics

FORMAT, VERSION = "hgf-checkpoint", 1
CKPT_DIR, LATEST = "checkpoints", "latest"
TRAIN_FILE, STATE_FILE, CONFIG_FILE = "train.safetensors", "state.json", "config.json"
DCP_DIR, DCP_LAYOUT = "dcp", "dcp"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _train_tensors(optimizer: Optimizer | None,
                   diagnostics: TernaryDiagnostics) -> dict[str, torch.Tensor]:
    out = {} if optimizer is None else {
        f"optim.{i}.{k}": v.detach().contiguous()
        for i, st in optimizer.state_dict()["state"].items() for k, v in st.items()}
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    out.update({f"diag.{k}": v for k, v in diagnostics.state_dict().items()})
    return out


def _group_layout(optimizer: Optimizer) -> list[dict[str, Any]]:
    return [{"name": g.get("name"), "n_params": len(g["params"])} for g in optimizer.param_groups]


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, enabled: bool = True) -> None:
        self.dir = Path(run_dir) / CKPT_DIR
        self.keep, self.enabled = keep, enabled

    # -- writing ------------------------------------------------------------------------------

    def save(self, step: int, cfg: Config, model: nn.Module, optimizer: Optimizer,
             sampler: BatchSampler, diagnostics: TernaryDiagnostics) -> Path | None:
        """Write ``step_NNNNNNN`` atomically, point ``latest`` at it, prune old ones. A sharded
        model is saved collectively (every rank calls this; rank 0 writes all but the shards)."""
        sharded = is_sharded(model)
        if not (self.enabled or sharded):
            return None
        final = self.dir / step_name(step)
        owner = broadcast_object(os.getpid()) if sharded else os.getpid()  # rank 0's on all ranks
        tmp = self.dir / f".tmp-{final.name}-{owner}"
        if self.enabled:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        try:
            if sharded:
                barrier()  # the folder exists before any rank writes into it
                save_dcp(model, optimizer, tmp / DCP_DIR)
            if self.enabled:
                self._write_rest(tmp, step, cfg, model, optimizer, sampler, diagnostics, sharded)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException:
            if self.enabled:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not self.enabled:
            return None
        atomic_write_text(self.dir / LATEST, final.name + "\n")
        self._prune(keep_name=final.name)
        return final

    @staticmethod
    def _write_rest(tmp: Path, step: int, cfg: Config, model: nn.Module, optimizer: Optimizer,
                    sampler: BatchSampler, diagnostics: TernaryDiagnostics, sharded: bool) -> None:
        """Everything but the DCP shards, then state.json listing every file with its hash."""
        if sharded:
            names = sorted(str(f.relative_to(tmp)) for f in (tmp / DCP_DIR).rglob("*")
                           if f.is_file())
        else:
            save_model(model, str(tmp / MODEL_FILE))
            names = [MODEL_FILE]
        save_file(_train_tensors(None if sharded else optimizer, diagnostics), str(tmp / TRAIN_FILE))
        save_config(cfg, tmp)
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                 for n in (*names, TRAIN_FILE, CONFIG_FILE)}
        state = {"format": FORMAT, "version": VERSION, "step": step,
                 "sampler": sampler.state_dict(), "groups": _group_layout(optimizer),
                 "files": files}
        if step == cfg.train.steps:
            state["final"] = True
        if world().world_size > 1:
            state["world_size"] = world().world_size
        if sharded:
            state["layout"] = DCP_LAYOUT
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")

    def _prune(self, keep_name: str) -> None:
        for old in self.checkpoints()[:-self.keep]:
            if old.name != keep_name and not _is_final(old):
                shutil.rmtree(old, ignore_errors=True)
        for tmp in self.dir.glob(".tmp-*"):  # left by a crash during an earlier save
            shutil.rmtree(tmp, ignore_errors=True)

    # -- finding and checking -----------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete-looking checkpoint folders, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir())

    def find_resumable(self) -> Path | None:
        """The newest usable checkpoint (``latest`` first), warning about skipped ones."""
        candidates = list(reversed(self.checkpoints()))
        pointer = self.dir / LATEST
        if pointer.is_file():
            named = self.dir / pointer.read_text(encoding="utf-8").strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        first_error = None
        for path in candidates:
            try:
                verify(path)
                return path
            except HGFError as e:
                first_error = first_error or e
                print(f"hgf: warning: skipping unusable checkpoint: {e}", file=sys.stderr)
        if first_error is not None:
            raise HGFError(f"no usable checkpoint in {self.dir} (newest: {first_error})")
        return None


def _is_final(path: Path) -> bool:
    """Whether a checkpoint is the end of a finished run (kept by pruning)."""
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("final") is True
    except (OSError, ValueError, AttributeError):
        return False


def verify(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder's state.json and every file's size and sha256; return the state."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HGFError(f"{path}: incomplete checkpoint ({STATE_FILE} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise HGFError(f"{path / STATE_FILE}: corrupt checkpoint state: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise HGFError(f"{path / STATE_FILE}: not an hgf checkpoint")
    if state.get("version") != VERSION:
        raise HGFError(f"{path / STATE_FILE}: checkpoint version {state.get('version')} is not "
                       f"supported (expected {VERSION})")
    if state.get("layout") not in (None, DCP_LAYOUT):
        raise HGFError(f"{path / STATE_FILE}: unknown checkpoint layout {state['layout']!r}")
    files = state.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(m, dict) and {"bytes", "sha256"} <= m.keys() for m in files.values()):
        raise HGFError(f"{path / STATE_FILE}: malformed checkpoint state (files)")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise HGFError(f"{f}: checkpoint file missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise HGFError(f"{f}: truncated or corrupt checkpoint file ({size} bytes, "
                           f"expected {meta['bytes']})")
        if _sha256(f) != meta["sha256"]:
            raise HGFError(f"{f}: corrupt checkpoint file (sha256 mismatch)")
    return state


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Optimizer,
                    sampler: BatchSampler, diagnostics: TernaryDiagnostics,
                    device: torch.device | str = "cpu") -> int:
    """Restore everything a checkpoint holds; return its step. Errors are one-line HGFErrors.
    With a sharded model every rank calls this."""
    path = Path(path)
    state = verify(path)
    if state["groups"] != _group_layout(optimizer):
        raise HGFError(f"{path}: optimizer groups {state['groups']} do not match this model's "
                       f"{_group_layout(optimizer)}")
    tensors = _read(path / TRAIN_FILE)
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    diag: dict[str, torch.Tensor] = {}
    for key, v in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "optim":
            idx, _, name = rest.partition(".")
            optim_state.setdefault(int(idx), {})[name] = v
        elif kind == "diag":
            diag[rest] = v
    if state.get("layout") == DCP_LAYOUT:
        load_dcp(model, optimizer, path / DCP_DIR)
    elif is_sharded(model):
        load_full(model, optimizer, _read(path / MODEL_FILE), optim_state)
    else:
        load_weights(model, path / MODEL_FILE, device)
        groups = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    sampler.load_state_dict(state["sampler"])
    diagnostics.load_state_dict(diag)
    return int(state["step"])


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise HGFError(f"{path}: corrupt checkpoint file: {e}") from None


# Keys that may change when a run is resumed: they affect logging and bookkeeping, not the math.
RESUME_FREE = {"train.progress", "train.resume", "train.out_dir", "train.log_every",
               "train.ckpt_every", "train.ckpt_minutes", "train.keep_checkpoints",
               "train.tensorboard", "train.device", "train.threads", "train.compile", "eval.every",
               "eval.full_at_end", "data.path", "data.cache_dir"}


# How the work is split over processes, not the math (the global batch is checked on its own).
RESUME_FREE |= {"dist.strategy", "dist.activation_checkpointing"}


# Keys checked by their meaning (the step and the schedule length) rather than their value.
LENGTH_KEYS = {"train.steps", "train.schedule_steps"}


def check_resumable_config(cfg: Config, stored_path: Path, world_size: int = 1,
                           step: int = 0) -> Config:
    """``cfg`` ready to resume the checkpoint at ``step`` whose config is ``stored_path``; raise
    if they differ in a key that changes training. The batch size may differ if the global batch
    ``train.batch_size × processes`` does not; ``train.steps`` may be any value >= ``step``; an
    unset ``train.schedule_steps`` takes over the checkpoint's schedule length."""
    stored_cfg = load_config_json(stored_path)
    stored = stored_cfg.to_dict()
    state_file = stored_path.parent / STATE_FILE
    stored_world = json.loads(state_file.read_text(encoding="utf-8")).get("world_size", 1)
    where = stored_path.parent
    for sec, body in cfg.to_dict().items():
        for key, value in body.items():
            name = f"{sec}.{key}"
            old = stored.get(sec, {}).get(key)
            if name == "train.batch_size":
                if value * world_size != old * stored_world:
                    raise HGFError(f"{where}: cannot resume, the global batch "
                                   f"train.batch_size × processes = {value}×{world_size} differs "
                                   f"from the checkpoint's {old}×{stored_world}")
            elif name not in RESUME_FREE | LENGTH_KEYS and old != value:
                raise HGFError(f"{where}: cannot resume, {name}={value!r} differs "
                               f"from the checkpoint's {old!r}; use another train.out_dir")
    t, length = cfg.train, stored_cfg.train.schedule_length
    if t.steps < step:
        raise HGFError(f"{where}: cannot resume, train.steps={t.steps} is below the checkpoint's "
                       f"step {step}")
    if t.schedule_length != length:
        if t.schedule_steps:
            raise HGFError(f"{where}: cannot resume, train.schedule_steps={t.schedule_steps} "
                           f"differs from the checkpoint's schedule length {length} (of its LR "
                           "and gate schedules); leave it unset or use another train.out_dir")
        cfg = replace(cfg, train={"schedule_steps": length})
    return cfg
