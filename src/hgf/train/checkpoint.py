"""Resumable checkpoints: safetensors tensors plus a JSON state file, no pickle.

Layout (``RUN_DIR/checkpoints/``)::

    step_0000400/
        model.safetensors   model weights (tied weights once)
        train.safetensors   optimizer state  ``optim.<param index>.<key>``, RNG states
                            ``rng.torch`` / ``rng.cuda``, diagnostics snapshots ``diag.<layer>``
        config.json         the resolved config
        state.json          format/version, step, batch-sampler state, optimizer group layout,
                            byte size and sha256 of every file above (checked before loading)
    latest                  the name of the newest complete checkpoint (written atomically)

A checkpoint is written into a temporary folder and renamed into place, so a crash leaves either
the previous checkpoints or the complete new one. Only the last ``train.keep_checkpoints`` are
kept. On resume an unusable checkpoint (truncated, corrupt, hash mismatch) is skipped with a
warning and the next older one is used; if none is usable that is an HGFError.
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

from hgf.config import Config, load_config_json
from hgf.errors import HGFError
from hgf.runs import MODEL_FILE, atomic_write_text, load_weights, save_config
from hgf.train.batches import BatchSampler
from hgf.train.diagnostics import TernaryDiagnostics

FORMAT, VERSION = "hgf-checkpoint", 1
CKPT_DIR, LATEST = "checkpoints", "latest"
TRAIN_FILE, STATE_FILE, CONFIG_FILE = "train.safetensors", "state.json", "config.json"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _train_tensors(optimizer: Optimizer, diagnostics: TernaryDiagnostics) -> dict[str, torch.Tensor]:
    out = {f"optim.{i}.{k}": v.detach().contiguous()
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
        """Write ``step_NNNNNNN`` atomically, point ``latest`` at it, prune old ones."""
        if not self.enabled:
            return None
        final = self.dir / step_name(step)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_model(model, str(tmp / MODEL_FILE))
            save_file(_train_tensors(optimizer, diagnostics), str(tmp / TRAIN_FILE))
            save_config(cfg, tmp)
            files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                     for n in (MODEL_FILE, TRAIN_FILE, CONFIG_FILE)}
            state = {"format": FORMAT, "version": VERSION, "step": step,
                     "sampler": sampler.state_dict(), "groups": _group_layout(optimizer),
                     "files": files}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.dir / LATEST, final.name + "\n")
        self._prune(keep_name=final.name)
        return final

    def _prune(self, keep_name: str) -> None:
        for old in self.checkpoints()[:-self.keep]:
            if old.name != keep_name:
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
    """Restore everything a checkpoint holds; return its step. Errors are one-line HGFErrors."""
    path = Path(path)
    state = verify(path)
    if state["groups"] != _group_layout(optimizer):
        raise HGFError(f"{path}: optimizer groups {state['groups']} do not match this model's "
                       f"{_group_layout(optimizer)}")
    load_weights(model, path / MODEL_FILE, device)
    try:
        tensors = load_file(str(path / TRAIN_FILE))
    except (SafetensorError, OSError) as e:
        raise HGFError(f"{path / TRAIN_FILE}: corrupt checkpoint file: {e}") from None
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    diag: dict[str, torch.Tensor] = {}
    for key, v in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "optim":
            idx, _, name = rest.partition(".")
            optim_state.setdefault(int(idx), {})[name] = v
        elif kind == "diag":
            diag[rest] = v
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    sampler.load_state_dict(state["sampler"])
    diagnostics.load_state_dict(diag)
    return int(state["step"])


# Keys that may change when a run is resumed: they affect logging and bookkeeping, not the math.
RESUME_FREE = {"train.progress", "train.resume", "train.out_dir", "train.log_every",
               "train.ckpt_every", "train.keep_checkpoints", "train.tensorboard", "train.device",
               "train.threads", "train.compile", "eval.every", "eval.full_at_end", "data.path",
               "data.cache_dir"}


def check_resumable_config(cfg: Config, stored_path: Path) -> None:
    """Raise if ``cfg`` differs from a checkpoint's config in a key that changes training."""
    stored = load_config_json(stored_path).to_dict()
    for sec, body in cfg.to_dict().items():
        for key, value in body.items():
            name = f"{sec}.{key}"
            old = stored.get(sec, {}).get(key)
            if name not in RESUME_FREE and old != value:
                raise HGFError(f"{stored_path.parent}: cannot resume, {name}={value!r} differs "
                               f"from the checkpoint's {old!r}; use another train.out_dir")
