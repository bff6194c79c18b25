"""Loading a model to run: what a path holds, the device, the model and its tokenizer.

    detect_format(path)        run | hf | bitnet | llama (a folder's config.json) or gguf
    resolve_device(name)       --device auto | cpu | cuda[:N]
    load_for_generation(path)  a run directory (its training model and tokenizer.json) or a
                               packed file (the packed model, on the native decoder where it can
                               run, and the tokenizer stored in the file)

Generation itself (hgf.infer.generate) only samples; ``hgf convert`` (hgf.hf.convert) and
``hgf train --init.from`` read :func:`detect_format` from here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from hgf.config import read_json
from hgf.data.tokenizer import check_tokenizer, check_tokenizer_file
from hgf.device import resolve_device as _resolve_device
from hgf.errors import HGFError
from hgf.hf.llama_import import is_llama, unsupported_architecture
from hgf.infer.engine import load_for_decode
from hgf.model.transformer import Transformer
from hgf.runs import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, load_trained


def detect_format(path: str | Path) -> str:
    """run | hf | bitnet | llama, from the folder's config.json (gguf: a .gguf file)."""
    if str(path).endswith(".gguf"):
        return "gguf"
    cfg_file = Path(path) / "config.json"
    d = read_json(cfg_file, "not found (expected a run, Hugging Face or BitNet folder)")
    if isinstance(d.get("model"), dict):
        return "run"
    if d.get("model_type") == "hgf":
        return "hf"
    quant = d.get("quantization_config") or {}
    if d.get("model_type") == "bitnet" or quant.get("quant_method") == "bitnet":
        return "bitnet"
    if is_llama(d):
        return "llama"
    if d.get("model_type"):  # another transformers architecture: name it
        raise unsupported_architecture(d, str(cfg_file))
    raise HGFError(f"{cfg_file}: cannot tell the format (not an hgf run, an hgf Hugging Face folder "
                   "or a bitnet checkpoint); pass --from")


def resolve_device(device: str) -> torch.device:
    """The device a ``--device`` option names (``auto``: CUDA when present)."""
    return _resolve_device(device, "--device")


def load_for_generation(path: str | Path, device: torch.device | str = "cpu",
                        kv_cache: str = "f32") -> tuple[Transformer, Tokenizer]:
    """A run directory (its training model and tokenizer.json) or a packed file (its packed
    model and the tokenizer stored in it; ``kv_cache``: the native decoder's KV cache type)."""
    path = Path(path)
    if path.is_dir():
        if kv_cache != "f32":
            raise HGFError("--kv-cache applies to a packed file (the native decoder); a run "
                           "directory runs the training model")
        if not (path / CONFIG_FILE).is_file():
            raise HGFError(f"{path}: not a run directory (no {CONFIG_FILE})")
        tok_path = path / TOKENIZER_FILE
        if not tok_path.is_file():
            raise HGFError(f"{tok_path}: the run has no tokenizer")
        model, cfg = load_trained(path, device)
        tok = check_tokenizer_file(tok_path, cfg.model.vocab_size, path / MODEL_FILE)
        return model.requires_grad_(False), tok
    model, header = load_for_decode(path, device, kv_cache=kv_cache)  # native where it can run
    if header.tokenizer_json is None:
        raise HGFError(f"{path}: the file carries no tokenizer; re-export it with "
                       "`hgf export RUN_DIR -o FILE --tokenizer tokenizer.json`")
    return model, check_tokenizer(header.tokenizer_json.encode("utf-8"), f"{path} (tokenizer)",
                                  header.config.model.vocab_size)
