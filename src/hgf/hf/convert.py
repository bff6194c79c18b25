"""Conversions between a run directory, a Hugging Face directory and a BitNet checkpoint.

    run     config.json (hgf Config), model.safetensors (hgf state dict), tokenizer.json
    hf      config.json (HGFPreTrainedConfig, model_type "hgf"), model.safetensors (the same
            tensors under the prefix ``model.``), generation_config.json, and when there is a tokenizer:
            tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast; eos =
            ``<|endoftext|>`` when the vocabulary has it)
    bitnet  a transformers ``bitnet`` checkpoint: config.json (BitNetConfig + quantization_config),
            model.safetensors (packed ternary weights), the tokenizer files as for hf
            (hgf.hf.bitnet_import reads it, hgf.hf.bitnet_export says what can be written)
    llama   a transformers ``LlamaForCausalLM`` folder (Llama 2/3, TinyLlama, SmolLM, ...): read
            into a dense hgf model, written from one (hgf.hf.llama_import)
    ptqtp   (target only) a run whose projections are two fitted ternary trit-planes with row
            scales, from a dense source, no training (hgf.hf.ptqtp_convert)

A conversion loads the source as an hgf Transformer + Config (+ tokenizer file, checked to fit the
model and, for a run, to be the one its weights record) and writes it in the target format; a run
written records its tokenizer in its weights (hgf.data.tokenizer). The output folder is written
next to its final place and renamed at the end, so a failed conversion leaves nothing
half-written; an existing non-empty output is refused, and a source must be a folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from hgf.config import Config
from hgf.data.tokenizer import check_tokenizer_file, tokenizer_metadata
from hgf.errors import HGFError
from hgf.hf import hf_tokenizer
from hgf.infer.load import detect_format
from hgf.model.transformer import Transformer
from hgf.runs import (
    MODEL_FILE,
    TOKENIZER_FILE,
    load_trained,
    output_dir,
    save_config,
    save_weights,
)

SOURCES = ("run", "hf", "bitnet", "llama", "gguf")
TARGETS = ("run", "hf", "bitnet", "llama", "ptqtp")


def load_source(path: str | Path, fmt: str, scale_convention: str = "auto",
                overrides: list[str] | None = None) -> tuple[Transformer, Config, dict[str, Any]]:
    """(model, cfg, info) of a source folder; ``info["tokenizer"]`` is its tokenizer file or None."""
    path = Path(path)
    if overrides and fmt not in ("bitnet", "gguf"):
        raise HGFError(f"config overrides apply only to --from bitnet|gguf, got {overrides[0]!r}")
    info: dict[str, Any] = {}
    if fmt == "run":
        model, cfg = load_trained(path)
    elif fmt == "hf":
        from hgf.hf.modeling import HGFForCausalLM

        try:
            hf = HGFForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise HGFError(f"{path}: cannot load as an hgf model: {str(e).splitlines()[0]}") from None
        model, cfg = hf.model, hf.config.to_hgf()
    elif fmt == "bitnet":
        from hgf.hf.bitnet_import import import_bitnet

        model, cfg, info = import_bitnet(path, scale_convention, overrides)
    elif fmt == "llama":
        from hgf.hf.llama_import import import_llama

        model, cfg, info = import_llama(path)  # info["tokenizer"]: see hgf.hf.llama_import
    elif fmt == "gguf":  # a llama.cpp bitnet file; its tokenizer comes back rebuilt (hgf.gguf.import_)
        from hgf.gguf.import_ import import_gguf

        return import_gguf(path, overrides)
    else:
        raise HGFError(f"unknown source format {fmt!r} (known: {', '.join(SOURCES)})")
    if "tokenizer" not in info:
        tok = path / TOKENIZER_FILE
        info["tokenizer"] = tok if tok.is_file() else None
        if tok.is_file():  # the folder's tokenizer must fit its model (and be the one it recorded)
            check_tokenizer_file(tok, cfg.model.vocab_size, path / MODEL_FILE, carried=True)
    return model, cfg, info


def write_run(model: Transformer, cfg: Config, out: str | Path, tokenizer: Path | None) -> Path:
    with output_dir(out) as tmp:
        save_config(cfg, tmp)
        save_weights(model, tmp / MODEL_FILE, metadata=tokenizer_metadata(tokenizer))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return Path(out)


def write_hf(model: Transformer, out: str | Path, tokenizer: Path | None) -> Path:
    """Save as a Hugging Face folder loadable with ``AutoModelForCausalLM.from_pretrained``
    (after ``import hgf.hf.modeling``, which registers the model type ``hgf``)."""
    from hgf.hf.modeling import HGFForCausalLM

    tok, eos = hf_tokenizer(tokenizer) if tokenizer is not None else (None, None)
    hf = HGFForCausalLM.from_transformer(model, eos_token_id=eos)
    hf.generation_config.eos_token_id = eos
    with output_dir(out) as tmp:
        hf.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)  # tokenizer_config.json (eos); keep the original tokenizer.json
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return Path(out)


def write_bitnet(model: Transformer, cfg: Config, out: str | Path, tokenizer: Path | None,
                 drop_correction: bool = False) -> dict[str, Any]:
    """Save as a transformers ``bitnet`` checkpoint (see hgf.hf.bitnet_export); for an HGF model
    with ``drop_correction`` returns the logit drift of pruning the correction."""
    from hgf.hf.bitnet_export import bitnet_config, bitnet_state_dict, check_exportable, correction_drift

    check_exportable(cfg, drop_correction)
    tok, eos = hf_tokenizer(tokenizer) if tokenizer is not None else (None, None)
    state = bitnet_state_dict(model)
    info = {"drift": correction_drift(model)} if cfg.model.linear == "hgf" else {}
    with output_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(bitnet_config(cfg, eos), indent=2) + "\n",
                                         encoding="utf-8")
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if tok is not None:
            tok.save_pretrained(tmp)
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return info


def convert(src: str | Path, to: str, out: str | Path, fmt: str = "auto",
            scale_convention: str = "auto", overrides: list[str] | None = None,
            drop_correction: bool = False) -> dict[str, Any]:
    """Convert ``src`` (format ``fmt``, auto-detected by default) into ``out`` in format ``to``;
    ``drop_correction`` lets ``to="bitnet"`` prune an HGF model's correction."""
    if to not in TARGETS:
        raise HGFError(f"unknown target format {to!r} (known: {', '.join(TARGETS)})")
    if drop_correction and to != "bitnet":
        raise HGFError("--drop-correction applies only to --to bitnet")
    if Path(src).exists() and not Path(src).is_dir() and Path(src).suffix != ".gguf":
        raise HGFError(f"{src}: not a folder (convert reads a run, Hugging Face or BitNet folder, "
                       "or a .gguf file)")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if to == "ptqtp":  # its overrides are the fit's options (--ptqtp.*)
        from hgf.hf.ptqtp_convert import write_ptqtp

        model, cfg, info = load_source(src, fmt, scale_convention)
        info |= write_ptqtp(model, cfg, out, info["tokenizer"], overrides, str(src))
        return {"from": fmt, "to": to, **info}
    model, cfg, info = load_source(src, fmt, scale_convention, overrides)
    if to == "run":
        write_run(model, cfg, out, info["tokenizer"])
    elif to == "hf":
        write_hf(model, out, info["tokenizer"])
    elif to == "llama":
        from hgf.hf.llama_import import write_llama

        write_llama(model, cfg, out, info["tokenizer"])
    else:
        info |= write_bitnet(model, cfg, out, info["tokenizer"], drop_correction)
    return {"from": fmt, "to": to, **info}
