"""The run-directory contract shared by training, evaluation, export and interop.

A finished (or checkpointed) run directory holds:
    config.json        the resolved config (``Config.to_dict()``)
    model.safetensors  the final training-model weights (tied weights stored once)
    tokenizer.json     the tokenizer (a ``tokenizers`` JSON file), when the run used one
    metrics.jsonl      one JSON object per logged step/eval (written by the trainer)
    checkpoints/       resumable checkpoints (trainer-owned layout)
    .hgf.lock          locked while a process trains there (:func:`run_lock`)

Files are written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from hgf.config import Config, ConfigError, load_config_json
from hgf.errors import HGFError, as_os_error

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; nothing partial is ever visible. On any
    failure the temporary file is removed and an I/O error (full disk, read-only folder, ...)
    names ``path``. With ``overwrite=False`` an existing ``path`` is never replaced: that is a
    FileExistsError, also when the file appears while ``write`` runs."""
    path = Path(path)
    prefix = f".{path.name}."
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = as_os_error(e, path, path.parent / prefix)
        if err is e:
            raise
        raise err from e


def _link_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (a hard link fails on an existing name, so
    there is no window in which another writer's file could be replaced)."""
    try:
        os.link(tmp, path)
    except OSError as e:  # a file system without hard links: check, then rename
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_config(cfg: Config, run_dir: str | Path) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata))


def load_weights(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """Load safetensors weights into ``model``; a missing/corrupt/mismatched file is an HGFError."""
    path = Path(path)
    if not path.is_file():
        raise HGFError(f"{path}: weights file not found")
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise HGFError(f"{path}: corrupt or incompatible weights file: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise HGFError(f"{path}: weights do not match the config: missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}")


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HGFError(f"{run_dir}: not a run directory (a file)" if run_dir.exists()
                       else f"{run_dir}: run directory not found")
    try:
        return load_config_json(run_dir / CONFIG_FILE)
    except ConfigError:
        raise
    except OSError as e:
        raise HGFError(f"{run_dir / CONFIG_FILE}: cannot read: {e}") from None


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu",
                 weights: str | Path | None = None) -> tuple[torch.nn.Module, Config]:
    """The training model of a run (its ``model.safetensors`` unless ``weights`` is given)."""
    from hgf.model import build_model

    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    load_weights(model, weights or Path(run_dir) / MODEL_FILE, device)
    return model.to(device).eval(), cfg


LOCK_FILE = ".hgf.lock"


class RunInUseError(HGFError):
    """Another process is training into the same run folder."""


@contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (``.hgf.lock``, an advisory ``flock``, released by
    the kernel when the process dies, so a killed run never leaves a stale lock) while a run
    trains there; a second process gets :class:`RunInUseError` at once. Where the folder cannot
    be written or the platform has no ``flock``, nothing is locked and the run's own writes
    report the problem. A folder this call created and nothing else wrote to is removed again."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    fd, run_dir = None, Path(run_dir)
    created = not run_dir.exists()
    if enabled and fcntl is not None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUseError(f"{run_dir}: another process is training this run (it holds "
                                f"{LOCK_FILE}); wait for it or stop it first") from None
    try:
        yield
    finally:
        if fd is not None:
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(run_dir, ignore_errors=True)  # a run that failed before writing
            os.close(fd)  # releases the lock


@contextmanager
def output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds; on failure it is
    removed and an I/O error (full disk, read-only folder, ...) names ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HGFError(f"{out}: output already exists and is not an empty folder")
    prefix = out.parent / f".{out.name}."
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix.name, dir=out.parent))
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        err = as_os_error(e, out, prefix)
        if err is e:
            raise
        raise err from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
