"""Export a trained model to the packed file (layout in hgf.infer.format).

Per ternary projection (BitLinear or HGFLinear with weight W):
    W_t, s_w = ternarize(W)        W_t ∈ {-1,0,1} packed (i2 | tq1 | sherry), s_w float32
               (Sherry: its 3:4 rule, hgf.model.sherry; packing sherry needs a 3:4 model)
Tequila's dead-zone bias folded: b = λ·Σ_{W_t = 0} W, float32 [out] (hgf.model.tequila).
HGF correction, gate g = φ(α) folded into B (so inference needs no gate):
    additive  y = T(x) + g·B(Ax)           ->  B' = g·B
    convex    y = (1-g)·T(x) + g·B(Ax)     ->  B' = g·B,  s_w' = s_w / (1-g)   (refused at g = 1)
since T(x) = x_int @ W_tᵀ / (s_x · s_w) is linear in 1/s_w. A, B' in FP16; embeddings / LM head
in FP16 or int8 per row; dense projections FP16; norms and λ vectors float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hgf.config import Config
from hgf.data.tokenizer import check_tokenizer_file
from hgf.errors import HGFError
from hgf.infer.format import PackedHeader, expected_tensors, make_metadata
from hgf.infer.ptqtp import pack_ptqtp, stored_bits_per_weight
from hgf.kernels import pack_ternary
from hgf.memory import SCALE_BYTES, memory_report
from hgf.model.quant import BitLinear
from hgf.model.roles import param_role, role_of
from hgf.model.transformer import build_model
from hgf.runs import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    atomic_write,
    load_run_config,
    load_trained,
)

PACKED_SUFFIX = ".hgf"  # the file name ``hgf export -o FOLDER`` gives: <run name>.hgf
SAFETENSORS_DTYPE = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16,
                     "F32": torch.float32}


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    h = t.detach().to(torch.float16)
    if not torch.isfinite(h).all():
        raise HGFError(f"{name}: values overflow FP16 (max |x| = {t.abs().max().item():.3g})")
    return h


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: ``W[v] ≈ q[v] · scale[v]``, scale = max|W[v]| / 127."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127  # [rows]
    q = (w.detach().float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_projection(mod: BitLinear, packing: str, name: str = "projection"
                    ) -> dict[str, torch.Tensor]:
    """The packed buffers of one training projection: ``weight_packed``, ``weight_scale``, for
    HGFLinear ``A`` and the gate-folded ``B``, for TequilaLinear the folded ``bias`` (``name``
    only labels errors)."""
    if mod.act_bits != 8:
        raise HGFError(f"{name}: the packed runtime needs quant.act_bits=8, the model uses "
                       f"{mod.act_bits}")
    w_t, s_w = mod.ternary()  # the layer's rule: BitNet's; Sherry's 3:4 rule for a SherryLinear
    try:
        out = {"weight_packed": pack_ternary(w_t.cpu(), packing)}
    except ValueError as e:  # e.g. sherry packing of a model that is not 3:4 sparse
        raise HGFError(f"{name}: {e}") from None
    for p_name, _ in mod.named_parameters(recurse=False):
        if param_role(name, mod, p_name) == "bias":  # Tequila's dead-zone bias, b = λ·Σ_dead W
            out["bias"] = mod.dead_bias().detach().float().cpu()
    if mod.rank:  # a corrected projection: the folded terms (HGFLinear.folded_terms)
        A, B, t_mult = mod.folded_terms()
        s_w = s_w.cpu() / t_mult
        out["A"], out["B"] = _fp16(f"{name}.A", A), _fp16(f"{name}.B", B)
    out["weight_scale"] = s_w.detach().float().cpu().reshape(())
    return out


def _ternary(name: str, mod: nn.Module, cfg: Config, packing: str,
             embeddings: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in pack_projection(mod, packing, name).items()}


def _embedding(name: str, mod: nn.Module, cfg: Config, packing: str,
               embeddings: str) -> dict[str, torch.Tensor]:
    if embeddings == "int8":
        q, scale = _int8_rows(mod.weight)
        return {f"{name}.weight": q, f"{name}.row_scale": scale}
    return {f"{name}.weight": _fp16(f"{name}.weight", mod.weight.cpu())}


def _head(name: str, mod: nn.Module, cfg: Config, packing: str,
          embeddings: str) -> dict[str, torch.Tensor]:
    return {} if cfg.model.tie_embeddings else _embedding(name, mod, cfg, packing, embeddings)


def _dense(name: str, mod: nn.Module, cfg: Config, packing: str,
           embeddings: str) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": _fp16(f"{name}.weight", mod.weight.cpu())}


def _rest(name: str, mod: nn.Module, cfg: Config, packing: str,
          embeddings: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{p_name}" if name else p_name: p.detach().float().cpu()
            for p_name, p in mod.named_parameters(recurse=False)}


# how a module of each role (hgf.model.roles) is exported (layout: hgf.infer.format.SPECS_BY_ROLE)
def _ptqtp(name: str, mod: nn.Module, cfg: Config, packing: str,
           embeddings: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in pack_ptqtp(mod, packing, name).items()}


PACK_BY_ROLE = {"ternary": _ternary, "ptqtp": _ptqtp, "embedding": _embedding, "head": _head,
                "dense": _dense, "other": _rest}


@torch.no_grad()
def pack_model(model: nn.Module, cfg: Config, packing: str = "i2",
               embeddings: str = "fp16") -> dict[str, torch.Tensor]:
    """The tensors of a packed file, checked against ``expected_tensors``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        tensors.update(PACK_BY_ROLE[role_of(name, mod)](name, mod, cfg, packing, embeddings))
    expected = expected_tensors(model, cfg, packing, embeddings)
    for name, spec in expected.items():
        t = tensors.get(name)
        if (t is None or t.dtype != SAFETENSORS_DTYPE[spec.dtype]
                or tuple(t.shape) != spec.shape):  # a bug here, never a user error
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise AssertionError(f"export produced a bad {name}: {got}, expected {spec}")
    assert set(tensors) == set(expected), sorted(set(tensors) ^ set(expected))
    return {k: v.contiguous() for k, v in tensors.items()}


def export_model(model: nn.Module, cfg: Config, out: str | Path, packing: str = "i2",
                 embeddings: str = "fp16", tokenizer_json: str | None = None,
                 overwrite: bool = True) -> None:
    """Write ``model`` (a training-layout Transformer) as a packed file, atomically; with
    ``overwrite=False`` an existing ``out`` is never replaced."""
    tensors = pack_model(model, cfg, packing, embeddings)
    meta = make_metadata(cfg, model, packing, embeddings, tokenizer_json)
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite)


def export_target(run_dir: str | Path, out: str | Path, inputs: list[Path],
                  force: bool = False) -> Path:
    """Where exporting ``run_dir`` to ``out`` writes: ``out``, or ``out/<run name>.hgf`` when
    ``out`` is a folder. An existing file is replaced only with ``force``, and never when it is
    inside the run (its weights, config, checkpoints, ...) or one of the ``inputs`` read."""
    run, out = Path(run_dir).resolve(), Path(out)
    if out.is_dir():
        out = out / f"{run.name}{PACKED_SUFFIX}"
        if out.is_dir():
            raise HGFError(f"{out}: is a folder; give the packed file to write with -o FILE")
    if not out.exists():
        return out
    target = out.resolve()
    if target.is_relative_to(run) or any(target == p.resolve() for p in inputs):
        raise HGFError(f"{out}: already exists and belongs to the run being exported ({run_dir}); "
                       "export never writes over it, even with --force: choose another -o")
    if not force:
        raise HGFError(f"{out}: already exists; pass --force to overwrite it")
    return out


def export_run(run_dir: str | Path, out: str | Path, packing: str = "i2",
               embeddings: str = "fp16", tokenizer: str | Path | None = None,
               force: bool = False) -> Path:
    """Export a run's trained model to ``out`` (see :func:`export_target`; returns the file
    written). The tokenizer (RUN_DIR/tokenizer.json unless given) goes into the file's metadata,
    checked to be the one the model was trained with; a run without one is exported without."""
    cfg = load_run_config(run_dir)
    weights = Path(run_dir) / MODEL_FILE
    tok_path = Path(tokenizer) if tokenizer else Path(run_dir) / TOKENIZER_FILE
    if tokenizer and not tok_path.is_file():
        raise HGFError(f"{tok_path}: tokenizer file not found")
    has_tok = tok_path.is_file()
    out = export_target(run_dir, out, [weights, Path(run_dir) / CONFIG_FILE]
                        + ([tok_path] if has_tok else []), force)
    tok = None
    if has_tok:
        check_tokenizer_file(tok_path, cfg.model.vocab_size, weights)
        tok = tok_path.read_text(encoding="utf-8")
    model, cfg = load_trained(run_dir)
    export_model(model, cfg, out, packing, embeddings, tok, overwrite=force)
    return out


# ---------------------------------------------------------------------------------------------
# What the file holds, by component


def byte_breakdown(header: PackedHeader) -> dict[str, float]:
    """Bytes per component of a packed file, measured from its tensors, and the correction
    overhead measured vs predicted by hgf.memory for the same config and packing."""
    by_role = header.bytes_by_role()
    backbone = by_role["ternary"] + by_role["scale"]
    predicted = memory_report(build_model(header.config, device="meta"))
    n_scales = sum(1 for s in header.tensors.values() if s.role == "scale")
    return {
        **by_role,
        "backbone": backbone,
        "tensor_total": sum(by_role.values()),
        "file_size": header.file_size,
        "header_bytes": header.file_size - header.data_bytes,
        "overhead_measured": by_role["correction"] / backbone if backbone else float("nan"),
        "overhead_predicted": predicted.overhead(header.packing) or float("nan"),
        "ternary_predicted": predicted.backbone_bytes(header.packing) - SCALE_BYTES * n_scales,
        "scale_predicted": SCALE_BYTES * n_scales,
        "correction_predicted": predicted.correction_bytes,
        "bias_predicted": predicted.bias_bytes,
    }


def format_breakdown(header: PackedHeader) -> str:
    b = byte_breakdown(header)
    kib = 1024
    rows = [
        ("ternary packed", b["ternary"], b["ternary_predicted"]),
        ("ternary scales (f32)", b["scale"], b["scale_predicted"]),
        ("correction A, B' (f16)", b["correction"], b["correction_predicted"]),
        ("Tequila bias (f32)", b["bias"], b["bias_predicted"]),
        (f"embeddings/head ({header.embeddings})", b["embedding"], None),
        ("dense projections (f16)", b["dense"], None),
        ("norms, λ (f32)", b["rest"], None),
        ("tensors, total", b["tensor_total"], None),
        ("header (config, tokenizer)", b["header_bytes"], None),
        ("file size on disk", b["file_size"], None),
    ]
    ptqtp = header.config.model.linear == "ptqtp"
    if ptqtp:  # hgf.memory counts one plane per projection: no prediction for two
        rows[:2] = [("ternary planes T1, T2", b["ternary"], None),
                    ("plane scales α (f32)", b["scale"], None)]
    lines = [f"{header.path}: packing {header.packing}, {len(header.tensors)} tensors",
             f"{'component':<30}{'file KiB':>12}{'hgf.memory KiB':>16}"]
    for label, got, pred in rows:
        p = "" if pred is None else f"{pred / kib:.2f}"
        lines.append(f"{label:<30}{got / kib:>12.2f}{p:>16}")
    if ptqtp:
        lines.append(f"PTQTP: two trit-planes per projection, {stored_bits_per_weight(header):.3f} "
                     "bits per projection weight as stored (planes + row scales)")
        return "\n".join(lines)
    if not b["backbone"]:
        lines.append("no ternary projections (a dense model): no correction overhead to report")
        return "\n".join(lines)
    if not b["correction"]:
        lines.append("no correction path (pure ternary): correction overhead 0%")
        return "\n".join(lines)
    lines.append(
        f"correction overhead = correction / packed backbone: measured {b['overhead_measured']:.3%}"
        f" from the file, predicted {b['overhead_predicted']:.3%} by hgf.memory (which also "
        "counts the FP16 gates; the file folds them into B')")
    return "\n".join(lines)
