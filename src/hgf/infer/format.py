"""The packed model file: a safetensors file with a versioned metadata header (docs/STYLE.md §9).

Tensors (names are the packed model's ``state_dict`` keys; ``N`` is a ternary projection):
    N.weight_packed   uint8  packed_shape(out, in, packing)   W_t = clamp(round(W·s_w), -1, 1)
    N.weight_scale    f32    []                               s_w (the divisor: W ≈ W_t / s_w)
    N.A               f16    [r, in]                          HGF correction
    N.B               f16    [out, r]                         B' = g·B (gate folded in)
    N.bias            f32    [out]                            Tequila: b = λ·Σ_dead W (folded)
    N.planes_packed   uint8  packed_shape(2·out, in, packing)  PTQTP: T₁ and T₂ stacked (rows)
    N.plane_scale     f32    [2, out]                          PTQTP: α₁, α₂ (hgf.infer.ptqtp)
    tok_emb.weight    f16    [vocab, d]    or int8 with tok_emb.row_scale f32 [vocab]
    lm_head.weight    f16    [vocab, d]    (absent when tied) or int8 with lm_head.row_scale
    other projections f16 (dense arms); norms and λ vectors f32
With ``--embeddings int8``:  W[v] ≈ W_int8[v] · row_scale[v],  row_scale = max|W[v]| / 127.
Convex fusion (y = (1-g)·T + g·C) is folded too: s_w' = s_w / (1-g), B' = g·B.

Metadata (all strings): ``format`` = "hgf-packed", ``format_version``, ``packing``,
``embeddings``, ``config`` (the resolved Config as JSON), ``layers`` (JSON {N: [out, in, rank]}),
``hgf_version`` and, when exported with one, ``tokenizer`` (the tokenizer.json text) — so one
file is all ``hgf generate`` needs.

Loading reads the header itself and checks, before any tensor is touched: format name and
version, byte sizes against the file length (truncation), every tensor's presence, dtype and
shape against what the stored config and packing imply. Each problem is one HGFError line.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from hgf.config import Config, ConfigError, config_from_dict
from hgf.errors import HGFError
from hgf.kernels import PACKINGS, packed_shape
from hgf.model.roles import modules_with_role, param_role, role_of

FORMAT_NAME = "hgf-packed"
FORMAT_VERSION = 1
EMBEDDINGS = ("fp16", "int8")
ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}
ROLES = ("ternary", "scale", "correction", "bias", "embedding", "dense", "rest")


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    role: str  # one of ROLES

    @property
    def nbytes(self) -> int:
        return ITEMSIZE[self.dtype] * math.prod(self.shape)


def _embedding_specs(name: str, shape: tuple[int, ...], embeddings: str,
                     role: str) -> dict[str, TensorSpec]:
    if embeddings == "int8":
        return {f"{name}.weight": TensorSpec("I8", shape, role),
                f"{name}.row_scale": TensorSpec("F32", shape[:1], role)}
    return {f"{name}.weight": TensorSpec("F16", shape, role)}


def _ternary_specs(name: str, mod: nn.Module, cfg: Config, packing: str,
                   embeddings: str) -> dict[str, TensorSpec]:
    specs = {}
    for p_name, p in mod.named_parameters(recurse=False):
        role = param_role(name, mod, p_name)
        if role == "ternary":  # W_t packed, and its scale
            specs[f"{name}.{p_name}_packed"] = TensorSpec(
                "U8", packed_shape(p.shape[0], p.shape[1], packing), "ternary")
            specs[f"{name}.{p_name}_scale"] = TensorSpec("F32", (), "scale")
        elif role == "correction":
            specs[f"{name}.{p_name}"] = TensorSpec("F16", tuple(p.shape), "correction")
        elif role == "bias":  # Tequila's λ: the folded dead-zone bias b = λ·Σ_dead W
            specs[f"{name}.bias"] = TensorSpec("F32", (mod.out_features,), "bias")
        elif role != "gate":  # gates are folded into B
            raise KeyError(f"{name}.{p_name}: no packed layout for parameter role {role!r}")
    return specs


def _embedding(name: str, mod: nn.Module, cfg: Config, packing: str,
               embeddings: str) -> dict[str, TensorSpec]:
    return _embedding_specs(name, tuple(mod.weight.shape), embeddings, "embedding")


def _head(name: str, mod: nn.Module, cfg: Config, packing: str,
          embeddings: str) -> dict[str, TensorSpec]:
    return {} if cfg.model.tie_embeddings else _embedding(name, mod, cfg, packing, embeddings)


def _dense(name: str, mod: nn.Module, cfg: Config, packing: str,
           embeddings: str) -> dict[str, TensorSpec]:
    return {f"{name}.weight": TensorSpec("F16", tuple(mod.weight.shape), "dense")}


def _rest(name: str, mod: nn.Module, cfg: Config, packing: str,
          embeddings: str) -> dict[str, TensorSpec]:
    return {f"{name}.{p_name}" if name else p_name: TensorSpec("F32", tuple(p.shape), "rest")
            for p_name, p in mod.named_parameters(recurse=False)}


# the tensors a module of each role (hgf.model.roles) has in the file
def _ptqtp(name: str, mod: nn.Module, cfg: Config, packing: str,
           embeddings: str) -> dict[str, TensorSpec]:
    from hgf.infer.ptqtp import ptqtp_specs  # it imports this module

    return ptqtp_specs(name, mod, packing)


SPECS_BY_ROLE = {"ternary": _ternary_specs, "ptqtp": _ptqtp, "embedding": _embedding,
                 "head": _head, "dense": _dense, "other": _rest}


def expected_tensors(model: nn.Module, cfg: Config, packing: str,
                     embeddings: str) -> dict[str, TensorSpec]:
    """Every tensor a packed file of this (training-layout, meta is fine) model must hold."""
    specs: dict[str, TensorSpec] = {}
    for name, mod in model.named_modules():
        specs.update(SPECS_BY_ROLE[role_of(name, mod)](name, mod, cfg, packing, embeddings))
    return specs


def ternary_layers(model: nn.Module) -> dict[str, list[int]]:
    """{N: [out, in, rank]} of every ternary projection (rank 0 = no correction)."""
    return {name: [m.out_features, m.in_features, m.rank]
            for name, m in modules_with_role(model, "ternary")}


# ---------------------------------------------------------------------------------------------
# Reading and checking a file


@dataclass
class PackedHeader:
    """What a packed file declares, checked against its own bytes and its config."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorSpec]  # as stored in the file (role filled in from the config)
    config: Config
    packing: str
    embeddings: str
    file_size: int
    data_bytes: int  # tensor bytes the header declares

    @property
    def tokenizer_json(self) -> str | None:
        return self.metadata.get("tokenizer")

    def bytes_by_role(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for spec in self.tensors.values():
            out[spec.role] += spec.nbytes
        return out


def _raw_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON, header length, file size) of a safetensors file, with one-line errors."""
    if not path.is_file():
        raise HGFError(f"{path}: packed model file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HGFError(f"{path}: not a packed model file ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise HGFError(f"{path}: truncated or not a safetensors file (header of {n} bytes, "
                           f"file of {size} bytes)")
        raw = f.read(n)
    try:
        return json.loads(raw), n, size
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HGFError(f"{path}: corrupt safetensors header (not JSON)") from None


def read_header(path: str | Path) -> PackedHeader:
    """Parse and check a packed file's header; raise one HGFError line naming the problem."""
    path = Path(path)
    raw, n, size = _raw_header(path)
    meta = raw.pop("__metadata__", None) or {}
    fmt, version = meta.get("format"), meta.get("format_version")
    if fmt != FORMAT_NAME:
        raise HGFError(f"{path}: not an hgf packed model (format={fmt!r}, expected "
                       f"{FORMAT_NAME!r}); export one with `hgf export RUN_DIR -o FILE`")
    if version != str(FORMAT_VERSION):
        raise HGFError(f"{path}: format version {version} is not supported (this hgf reads "
                       f"version {FORMAT_VERSION}); re-export it with this hgf")
    packing, embeddings = meta.get("packing"), meta.get("embeddings")
    if packing not in PACKINGS:
        raise HGFError(f"{path}: unknown packing {packing!r} (known: {', '.join(PACKINGS)})")
    if embeddings not in EMBEDDINGS:
        raise HGFError(f"{path}: unknown embeddings {embeddings!r} (known: {', '.join(EMBEDDINGS)})")
    try:
        cfg = config_from_dict(json.loads(meta.get("config", "")), f"{path} (config)")
    except json.JSONDecodeError:
        raise HGFError(f"{path}: metadata 'config' is not valid JSON") from None
    except ConfigError as e:
        raise HGFError(str(e)) from None

    stored: dict[str, TensorSpec] = {}
    data_end = 0
    for name, info in raw.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HGFError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if dtype not in ITEMSIZE:
            raise HGFError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        stored[name] = TensorSpec(dtype, shape, "rest")
        if end - start != stored[name].nbytes:
            raise HGFError(f"{path}: tensor {name} declares {end - start} bytes, its dtype "
                           f"{dtype} and shape {list(shape)} need {stored[name].nbytes}")
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise HGFError(f"{path}: truncated: the header declares {8 + n + data_end} bytes, "
                       f"the file has {size}")
    header = PackedHeader(path, meta, stored, cfg, packing, embeddings, size, data_end)
    check_tensors(header)
    return header


def check_tensors(header: PackedHeader) -> None:
    """Compare the stored tensors with what the config and packing imply; fill in roles."""
    from hgf.model.transformer import build_model

    model = build_model(header.config, device="meta")
    path = header.path
    expected = expected_tensors(model, header.config, header.packing, header.embeddings)
    layers = json.dumps(ternary_layers(model), sort_keys=True)
    if json.dumps(json.loads(header.metadata.get("layers", "{}")), sort_keys=True) != layers:
        raise HGFError(f"{path}: metadata 'layers' does not match the stored config")
    missing = sorted(set(expected) - set(header.tensors))
    unexpected = sorted(set(header.tensors) - set(expected))
    if missing:
        raise HGFError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise HGFError(f"{path}: unexpected tensor {unexpected[0]} "
                       f"({len(unexpected)} unexpected in all)")
    for name, want in expected.items():
        got = header.tensors[name]
        if got.dtype != want.dtype:
            raise HGFError(f"{path}: tensor {name} has dtype {got.dtype}, expected {want.dtype}")
        if got.shape != want.shape:
            extra = f" for packing {header.packing}" if want.role == "ternary" else ""
            raise HGFError(f"{path}: tensor {name} has shape {list(got.shape)}, expected "
                           f"{list(want.shape)}{extra}")
        header.tensors[name] = want


def make_metadata(cfg: Config, model: nn.Module, packing: str, embeddings: str,
                  tokenizer_json: str | None) -> dict[str, str]:
    from hgf import __version__

    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "packing": packing,
        "embeddings": embeddings, "config": json.dumps(cfg.to_dict()),
        "layers": json.dumps(ternary_layers(model)), "hgf_version": __version__,
    }
    if tokenizer_json is not None:
        meta["tokenizer"] = tokenizer_json
    return meta
