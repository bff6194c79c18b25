"""Start training from a pretrained model: ``hgf train CONFIG --init.from=SOURCE``.

SOURCE is a run folder, an hgf Hugging Face folder, a Llama folder (``LlamaForCausalLM``) or a
BitNet checkpoint (``hgf.infer.load.detect_format``). Two steps:

1. Config (:func:`build_train_config`, what ``hgf train`` uses): the source's architecture is laid
   on top of the config — ``model.vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff,
   attention, mlp, tie_embeddings, rope_theta, norm_eps`` (:data:`ARCH_KEYS`) — so a preset such
   as configs/bitnet.toml needs no sizes; ``model.size`` is ignored for these keys. A key the TOML
   or command line sets explicitly must equal the source's, else a one-line error.
   ``model.max_seq_len`` and ``data.tokenizer`` (the source's tokenizer.json) are taken from the
   source unless set (an unset ``train.seq_len`` longer than the context shrinks to it).
   ``init.subln = off`` sets ``model.subln = off``. (``hgf train``, ``info``, ``plan`` and
   ``data`` resolve a TOML config this way; ``hgf train RUN_DIR`` uses the run's stored config.)

2. Weights (:func:`initialise`, run by the trainer on a fresh run only — a resumed run restores
   its checkpoint and never reads the source again). Every tensor of the new model is copied from
   the source tensor of the same name and shape (a dense source's W becomes the latent weight of
   a BitLinear/HGFLinear: its first forward is the ternarization of W, the post-training
   quantization of the source). Tensors the source lacks:
     HGF ``A``, ``B``   ``hgf.init = svd``: the top-r SVD of the projection's quantization residual
                        ``W − W_t/s_w`` (divided by the gate g0, so that g·BA is the best rank-r
                        fix of the quantization error; LoftQ-like, one step), or ``kaiming``: the
                        LoRA init (A Kaiming-uniform, B = 0: the model starts as the ternarized
                        source); the gate starts at ``hgf.gate_init``
     SubLN norms        An RMSNorm is not the identity: ``RMSNorm(x)·w = x · w/rms(x)``.
                        ``init.subln = identity`` sets every weight of a norm to c = the mean over
                        calibration tokens of rms(x), x the norm's input in the source (the input
                        of o_proj / down_proj), which is the least-squares best scalar:
                        argmin_c E‖x·c/rms(x) − x‖² = E[rms(x)]. The norm then changes only the
                        per-token scale of its input around its mean. Calibration tokens:
                        ``init.calib_batches`` global batches (train.batch_size × processes) of
                        train.seq_len windows spread evenly over the train split.
                        ``ones``: weight 1 (a fresh model's init; the output scale becomes
                        1/rms(x)). ``off``: no SubLN.
     a method's own     parameters of the ``bias`` role (Tequila's λ, hgf.model.roles) keep the
     parameters         method's init (``kept`` in the returned info); Sherry has none (its 3:4
                        mask is a function of the latent weights: its first forward is the 3:4
                        ternarization of W)
   A source tensor the new model has no place for is an error, except an HGF source's ``A``,
   ``B``, ``gate`` and a Tequila source's λ (dropped, said in the returned info). Shapes that
   differ are a one-line error naming the tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hgf.config import Config, build_config, kv_heads, load_config_json, parse_overrides, read_toml
from hgf.errors import HGFError
from hgf.infer.load import detect_format
from hgf.model.hgf_linear import CORRECTION_PARAMS, hgf_layers
from hgf.model.init import copy_whole_
from hgf.model.roles import param_role
from hgf.runs import CONFIG_FILE, TOKENIZER_FILE

ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "attention",
             "mlp", "tie_embeddings", "rope_theta", "norm_eps")
SOURCE_DEFAULTS = ("max_seq_len",)  # from the source unless set
CORRECTION = tuple(f".{p}" for p in CORRECTION_PARAMS)  # .A .B .gate .gate_w
SUBLN_INPUT = {"attn": "o_proj", "mlp": "down_proj"}  # the projection each SubLN feeds
METHOD_ROLES = ("bias",)  # a method's own parameters (Tequila's λ): kept at their init / dropped


def _where(path: str) -> str:
    return f"init.from={path}"


# ---------------------------------------------------------------------------------------------
# The source


def source_format(path: str | Path, what: str = "init.from") -> str:
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        raise HGFError(f"{what}={path}: not a run, Hugging Face or Llama folder ({CONFIG_FILE} "
                       "not found)")
    return detect_format(p)


def source_config(path: str | Path, what: str = "init.from") -> Config:
    """The hgf Config of a source folder, reading only its config.json where possible."""
    from hgf.config import config_from_dict, read_json

    fmt, p = source_format(path, what), Path(path)
    if fmt == "run":
        return load_config_json(p / CONFIG_FILE)
    if fmt == "hf":
        return config_from_dict(read_json(p / CONFIG_FILE).get("hgf_config") or {},
                                str(p / CONFIG_FILE))
    if fmt == "llama":
        from hgf.hf.llama_import import config_from_llama

        return config_from_llama(read_json(p / CONFIG_FILE), str(p / CONFIG_FILE))
    return load_source_model(path, what)[1]


def load_source_model(path: str | Path, what: str = "init.from") -> tuple[nn.Module, Config]:
    """(model on the CPU in eval mode, its Config) of a source folder."""
    from hgf.hf.convert import load_source

    model, cfg, _ = load_source(path, source_format(path, what))
    return model.float().eval(), cfg


def source_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer file training from ``path`` should tokenize with (None: the folder has none)."""
    p = Path(path)
    tok = p / TOKENIZER_FILE
    if not tok.is_file():
        return None
    if source_format(p) == "llama":
        from hgf.config import read_json
        from hgf.hf.llama_import import run_tokenizer

        if run_tokenizer(p, read_json(p / CONFIG_FILE)) != tok:
            raise HGFError(f"{_where(str(path))}: its tokenizer has no <|endoftext|>; convert the "
                           f"folder first (hgf convert {path} --to run RUN, which renames its "
                           "end-of-sequence token) and use init.from=RUN, or set data.tokenizer")
    return tok  # as the source was named (relative stays relative: no machine's paths in configs)


# ---------------------------------------------------------------------------------------------
# Config


def _explicit(layers: tuple[tuple[dict[str, Any], str], ...], sec: str, key: str) -> str | None:
    """The source name of the last layer that sets ``sec.key``, or None."""
    found = None
    for d, source in layers:
        if key in (d.get(sec) or {}):
            found = source
    return found


def build_train_config(*layers: tuple[dict[str, Any], str]) -> Config:
    """``build_config(*layers)`` with, when ``init.from`` is set, the source's architecture on top
    (rules in the module docstring)."""
    cfg = build_config(*layers)
    path = cfg.init.from_
    if not path:
        return cfg
    src = source_config(path).model
    top: dict[str, dict[str, Any]] = {"model": {}}
    for key in ARCH_KEYS:
        ours, theirs = getattr(cfg.model, key), getattr(src, key)
        if key == "n_kv_heads":
            ours, theirs = kv_heads(cfg.model), kv_heads(src)
        where = _explicit(layers, "model", key)
        if where is not None and ours != theirs:
            raise HGFError(f"{where}: model.{key}={ours!r} does not match the {_where(path)} "
                           f"source's {theirs!r} (leave it unset to take the source's)")
        top["model"][key] = getattr(src, key)
    for key in SOURCE_DEFAULTS:
        if _explicit(layers, "model", key) is None:
            top["model"][key] = getattr(src, key)
    max_len = top["model"].get("max_seq_len", cfg.model.max_seq_len)
    if _explicit(layers, "train", "seq_len") is None and cfg.train.seq_len > max_len:
        top["train"] = {"seq_len": max_len}  # the default must fit the source's context
    if src.size != "debug":  # an hgf source's size label; the dims above are what counts
        top["model"]["size"] = src.size
    if cfg.init.subln == "off":
        if _explicit(layers, "model", "subln") and cfg.model.subln == "on":
            raise HGFError("model.subln=on contradicts init.subln=off")
        top["model"]["subln"] = "off"
    if _explicit(layers, "data", "tokenizer") is None:
        tok = source_tokenizer(path)
        if tok is not None:
            top["data"] = {"tokenizer": str(tok)}
    return build_config(*layers, (top, _where(path)))


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """:func:`hgf.config.load_config` (defaults < size < TOML < overrides) with the init.from
    source's architecture (:func:`build_train_config`)."""
    layers: list[tuple[dict[str, Any], str]] = [(read_toml(path), str(path))]
    if overrides:
        layers.append((parse_overrides(overrides), "command line"))
    return build_train_config(*layers)


def _own_role(model: nn.Module, name: str) -> str | None:
    """The hgf.model.roles role of the state-dict entry ``name`` (None for a buffer)."""
    mod_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return None
    if leaf not in dict(mod.named_parameters(recurse=False)):
        return None
    return param_role(mod_name, mod, leaf)


def check_compatible(cfg: Config, src: Config, path: str) -> None:
    """One-line HGFError when ``cfg``'s architecture differs from the source's."""
    for key in ARCH_KEYS:
        ours, theirs = getattr(cfg.model, key), getattr(src.model, key)
        if key == "n_kv_heads":
            ours, theirs = kv_heads(cfg.model), kv_heads(src.model)
        if ours != theirs:
            raise HGFError(f"{_where(path)}: model.{key}={ours!r} does not match the source's "
                           f"{theirs!r}")


# ---------------------------------------------------------------------------------------------
# Weights


def calibration_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                        n_batches: int) -> list[torch.Tensor]:
    """``n_batches`` id batches ``[batch_size, seq_len]`` of windows spread evenly over ``tokens``."""
    n = batch_size * n_batches
    last = len(tokens) - seq_len
    if last < 0:
        raise HGFError(f"calibration needs {seq_len} tokens, the train split has {len(tokens)}")
    starts = np.linspace(0, last, n).astype(np.int64)
    rows = np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts])
    return list(torch.from_numpy(rows).split(batch_size))


@torch.no_grad()
def subln_input_rms(source: nn.Module, names: list[str], batches: list[torch.Tensor],
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean over tokens of rms(x), x the input of each module in ``names`` of ``source``."""
    sums = {n: 0.0 for n in names}
    count = 0
    hooks = []
    for name in names:
        def hook(_mod, args, name=name):
            x = args[0].float()
            sums[name] += float(x.pow(2).mean(-1).sqrt().sum())
        hooks.append(source.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for ids in batches:
            source(ids.to(device))
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return {n: s / max(count, 1) for n, s in sums.items()}


@torch.no_grad()
def initialise(model: nn.Module, cfg: Config, source: nn.Module, source_cfg: Config,
               calib: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Copy ``source`` into ``model`` (built from ``cfg``, not yet trained) as the module docstring
    says; return what was done: ``copied``, ``dropped``, ``subln`` (norm -> weight) and
    ``correction`` (how A, B were initialised)."""
    path = cfg.init.from_ or "source"
    check_compatible(cfg, source_cfg, path)
    ours, theirs = model.state_dict(), source.state_dict()
    device = next(model.parameters()).device
    copied, sublns, corrections, dropped, kept = 0, [], [], [], []
    for name, t in ours.items():
        if name in theirs:
            if tuple(theirs[name].shape) != tuple(t.shape):
                raise HGFError(f"{_where(path)}: {name} has shape {tuple(theirs[name].shape)} in "
                               f"the source, {tuple(t.shape)} here")
            copy_whole_(t, theirs[name].to(device=t.device, dtype=t.dtype))  # sharded: its part
            copied += 1
        elif name.endswith(CORRECTION):
            corrections.append(name)
        elif _own_role(model, name) in METHOD_ROLES:
            kept.append(name)  # e.g. Tequila's λ: the method's own init
        elif name.rsplit(".", 2)[-2] == "subln":
            sublns.append(name)
        else:
            raise HGFError(f"{_where(path)}: the source has no tensor {name} (source "
                           f"model.linear={source_cfg.model.linear}, attention="
                           f"{source_cfg.model.attention})")
    for name in theirs:
        if name in ours:
            continue
        if name.endswith(CORRECTION) or _own_role(source, name) in METHOD_ROLES:
            dropped.append(name)
        elif ".subln." in name:
            raise HGFError(f"{_where(path)}: the source has SubLN norms ({name}) but model.subln "
                           "is off here")
        else:
            raise HGFError(f"{_where(path)}: source tensor {name} has no place in this model")

    info: dict[str, Any] = {"copied": copied, "dropped": sorted({n.rsplit(".", 1)[0]
                                                                 for n in dropped})}
    if kept:
        info["kept"] = sorted(kept)
    if sublns:
        mode = cfg.init.subln
        if mode == "off":
            raise HGFError("init.subln=off but model.subln is on here: set model.subln=off")
        norms = [n.removesuffix(".weight") for n in sublns]
        if mode == "identity":
            if not calib:
                raise HGFError("init.subln=identity needs calibration tokens")
            parents = {n: n.removesuffix(".subln") for n in norms}  # layers.N.attn | .mlp
            inputs = {n: f"{p}.{SUBLN_INPUT[p.rsplit('.', 1)[-1]]}" for n, p in parents.items()}
            was = next(source.parameters()).device
            source.to(device)
            try:
                rms = subln_input_rms(source, list(inputs.values()), calib, device)
            finally:
                source.to(was)
            values = {n: rms[inputs[n]] for n in norms}
        else:
            values = {n: 1.0 for n in norms}
        for n, v in values.items():
            model.get_submodule(n).weight.fill_(v)
        info["subln"] = values
    touched = {n.rsplit(".", 1)[0] for n in corrections}
    if touched:
        kind = cfg.hgf.init
        for name, mod in hgf_layers(model):
            if name in touched and kind == "svd":
                mod.init_from_residual_svd()
        info["correction"] = f"{kind} on {len(touched)} projections"
    return info


def model_initialiser(cfg: Config, train_tokens: np.ndarray, device: torch.device | str,
                      note: bool = True) -> Callable[[nn.Module], dict[str, Any]] | None:
    """``None`` without ``init.from``; else a function that initialises a freshly built model
    from the source (loaded now, so that a bad source fails before the run starts)."""
    path = cfg.init.from_
    if not path:
        return None
    source, source_cfg = load_source_model(path)
    check_compatible(cfg, source_cfg, path)
    calib = None
    if cfg.init.subln == "identity":
        from hgf.parallel import world

        # the global batch: every process calibrates on the same windows (same weights)
        calib = calibration_batches(train_tokens, cfg.train.batch_size * world().world_size,
                                    cfg.train.seq_len, cfg.init.calib_batches)

    def init(model: nn.Module) -> dict[str, Any]:
        info = initialise(model, cfg, source, source_cfg, calib)
        if note:
            what = f"{info['copied']} tensors copied"
            if "subln" in info:
                vals = list(info["subln"].values())
                what += (f", SubLN {cfg.init.subln} (weights {min(vals):.3g}..{max(vals):.3g})")
            if "correction" in info:
                what += f", correction {info['correction']}"
            if info["dropped"]:
                what += f", the source's correction dropped on {len(info['dropped'])} projections"
            print(f"hgf: initialised from {path} ({source_cfg.model.linear}): {what}",
                  file=sys.stderr, flush=True)
        return info

    return init
