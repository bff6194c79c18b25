"""Export an hgf model to GGUF files that llama.cpp runs (mapping and tolerances: docs/GGUF.md).

Ternary arms with standard attention (``bitnet``, ``hgf_std``) -> llama.cpp architecture
``bitnet`` (pre-norm RMSNorm blocks, NEOX RoPE, SwiGLU, SubLN ``attn_sub_norm``/``ffn_sub_norm``,
the token embedding as the output head). Every projection with latent weight ``W``:

    blk.N.<proj>.weight   TQ2_0 (--packing i2, 2.06 bits/weight) or TQ1_0 (tq1, 1.69) holding
                          W_t = clamp(round(W·s_w), -1, 1) itself, so every 256-value block has
                          the f16 scale d = 1 (exact) and the values are hgf's ternary values
    blk.N.<proj>.scale    f32 [1] = 1/s_w = mean|W|: llama.cpp computes (W_t x)·scale

llama.cpp quantizes the activations of a TQ matmul to q8_K (int8 with one scale per 256 values);
hgf quantizes per token (one scale per row). That is the one arithmetic difference: with
hgf.gguf.emulate's q8_K quantizer the two agree to float32 rounding (tests/test_gguf_llama.py).

The HGF correction: ``y = μ·T(x) + g·B(A x)`` (μ = 1 additive, 1 - g convex). llama.cpp's LoRA
adds ``scale·B(A x)`` to the output of the same matmul, reading the same input ``x`` (the
normalised, unquantized activations), after the ``.scale`` multiply. So the adapter holds
``lora_a = A`` [r, in] and ``lora_b = g·B`` [out, r] (f32, the gate folded) with
``adapter.lora.alpha = r`` (LoRA scale alpha/r = 1), and convex fusion folds ``μ`` into ``.scale``.
One exception, checked against the real llama.cpp (tests/test_gguf_llama.py): for ``ffn_gate``
and ``ffn_up`` llama.cpp's ``build_ffn`` multiplies by ``.scale`` *after* adding the LoRA term,
so their ``lora_b`` is ``g·B / scale``.

The fp16 arm (dense projections) -> architecture ``llama``: F16 projections, an ``output`` head
when untied, and Q/K rows permuted from hgf's half-split RoPE to llama.cpp's interleaved (NORM)
layout, as convert_hf_to_gguf.py does for Hugging Face LLaMA checkpoints.

Refused with one line: differential attention, relu2 MLPs, SubLN off (bitnet) or on (llama),
untied heads in the bitnet architecture (llama.cpp reads the head from token_embd), activation
bits other than 8, projection widths that are not multiples of 256 (the TQ block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hgf.config import Config, subln_enabled
from hgf.errors import HGFError
from hgf.gguf import require_gguf
from hgf.gguf.tokenizer import add_vocab, vocab_from_tokenizer_json
from hgf.kernels.packing import PACKING_REGISTRY
from hgf.model.linear import ATTENTION_PROJ, MLP_PROJ
from hgf.model.quant import BitLinear, ternarize
from hgf.model.transformer import Transformer
from hgf.runs import TOKENIZER_FILE, atomic_write, load_trained

QK_K = 256  # values per TQ1_0 / TQ2_0 / q8_K block
# hgf packing (or the GGML type's own lower-case name) -> GGML type, from the packing registry
_GGUF_PACKINGS = [p for p in PACKING_REGISTRY.values() if p.gguf_type]
PACKING_TYPES = ({p.name: p.gguf_type for p in _GGUF_PACKINGS}
                 | {p.gguf_type.lower(): p.gguf_type for p in _GGUF_PACKINGS})
EMBEDDING_TYPES = {"fp16": "F16", "fp32": "F32", "int8": "Q8_0"}
ARMS_HELP = ("exportable arms: bitnet and hgf_std (ternary, standard attention) and fp16 "
             "(dense, standard attention)")
GGUF_NAMES = {  # hgf role -> GGUF tensor name in block N
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
# llama.cpp's build_ffn adds the LoRA term of ffn_gate/ffn_up *before* multiplying by their
# ``.scale`` ((W_t x + B'(A x))·scale); q/k/v/o and ffn_down get W_t x·scale + B'(A x)
# (build_lora_mm with the scale). So lora_b of gate/up is divided by the scale.
LORA_INSIDE_SCALE = ("gate_proj", "up_proj")
NORM_NAMES = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.subln": "attn_sub_norm",
              "mlp.subln": "ffn_sub_norm"}


def hgf_module(layer: int, role: str) -> str:
    return f"layers.{layer}.{'attn' if role in ATTENTION_PROJ else 'mlp'}.{role}"


def gguf_arch(cfg: Config) -> str:
    """``bitnet`` or ``llama``: the llama.cpp architecture ``cfg`` maps to, or a one-line
    HGFError saying why it cannot be exported."""
    m, q = cfg.model, cfg.quant
    if m.attention != "standard":
        raise HGFError(f"model.attention={m.attention}: llama.cpp has no differential attention; "
                       f"{ARMS_HELP}")
    if m.mlp != "swiglu":
        raise HGFError(f"model.mlp={m.mlp}: llama.cpp's bitnet and llama architectures use a SwiGLU "
                       "MLP (squared ReLU cannot be mapped)")
    if m.linear in ("tequila", "sherry", "ptqtp"):  # a per-row bias / a 3:4 rule / two planes
        # with row scales: none of them is a llama.cpp tensor type
        raise HGFError(f"model.linear={m.linear}: not exportable to GGUF yet (use the hgf packed "
                       f"file); {ARMS_HELP}")
    if m.linear == "dense":
        if subln_enabled(m):
            raise HGFError("model.subln=on: llama.cpp's llama architecture has no SubLN norms")
        return "llama"
    if not subln_enabled(m):
        raise HGFError("model.subln=off: llama.cpp's bitnet architecture always applies "
                       "attn_sub_norm and ffn_sub_norm")
    if not m.tie_embeddings:
        raise HGFError("model.tie_embeddings=false: llama.cpp's bitnet architecture uses token_embd "
                       "as the output head, so an untied lm_head cannot be exported")
    if q.act_bits != 8:
        raise HGFError(f"quant.act_bits={q.act_bits}: llama.cpp's TQ matmuls quantize activations "
                       "to 8 bits")
    for key, width in (("model.d_model", m.d_model), ("model.d_ff", m.d_ff)):
        if width % QK_K:
            raise HGFError(f"{key}={width}: TQ1_0/TQ2_0 store rows in blocks of {QK_K} values; "
                           f"the projection inputs must be multiples of {QK_K}")
    return "bitnet"


def ternary_and_scale(mod: BitLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_t, scale)`` of a ternary projection: the TQ values and the ``.scale`` multiplier
    ``μ/s_w`` (``μ`` folds convex fusion's 1 - g; 1 otherwise)."""
    w_t, s_w = ternarize(mod.weight, mod.weight_eps)
    scale = 1.0 / s_w.float().cpu()
    if mod.rank:  # a corrected projection (HGFLinear.folded_terms)
        scale = scale * mod.folded_terms()[2]
    return w_t.cpu(), scale


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Q/K ``[heads·hd, in]`` from half-split RoPE pairs (i, i + hd/2) to interleaved
    pairs (2i, 2i + 1) (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@dataclass
class GGUFTensors:
    """Tensors to write: name -> (numpy data, GGML type name)."""

    items: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)

    def add(self, name: str, data: np.ndarray, qtype: str) -> None:
        self.items[name] = (data, qtype)


def _quantize(gguf, data: np.ndarray, qtype: str) -> np.ndarray:
    t = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.quantize(data.astype(np.float32), t)


@torch.no_grad()
def model_tensors(model: Transformer, cfg: Config, packing: str = "i2",
                  embeddings: str = "fp16", drop_correction: bool = False) -> GGUFTensors:
    """The base model's GGUF tensors (already quantized), for the arch :func:`gguf_arch` gives.
    An HGF model's correction is not in it (:func:`lora_tensors`); ``drop_correction`` only
    acknowledges that the caller drops it."""
    arch = gguf_arch(cfg)
    if packing not in PACKING_TYPES:
        raise HGFError(f"packing {packing!r} has no GGUF type (known: {', '.join(PACKING_TYPES)})")
    if embeddings not in EMBEDDING_TYPES:
        raise HGFError(f"embeddings {embeddings!r} have no GGUF type (known: "
                       f"{', '.join(EMBEDDING_TYPES)})")
    gguf = require_gguf()
    m = cfg.model
    emb_type = EMBEDDING_TYPES[embeddings]
    out = GGUFTensors()
    out.add("token_embd.weight", _np(model.tok_emb.weight), emb_type)
    out.add("output_norm.weight", _np(model.norm.weight), "F32")
    if arch == "llama" and not m.tie_embeddings:
        out.add("output.weight", _np(model.lm_head.weight), emb_type)
    for i in range(m.n_layers):
        for ours, theirs in NORM_NAMES.items():
            if "subln" not in ours or arch == "bitnet":
                out.add(f"blk.{i}.{theirs}.weight",
                        _np(model.get_submodule(f"layers.{i}.{ours}").weight), "F32")
        for role in ATTENTION_PROJ + MLP_PROJ:
            mod = model.get_submodule(hgf_module(i, role))
            name = f"blk.{i}.{GGUF_NAMES[role]}"
            if arch == "llama":
                w = mod.weight.detach().float()
                if role in ("q_proj", "k_proj"):
                    w = _permute_rope(w, m.n_heads)
                out.add(f"{name}.weight", _np(w), "F16")
                continue
            w_t, scale = ternary_and_scale(mod)
            out.add(f"{name}.weight", _np(w_t), PACKING_TYPES[packing])
            out.add(f"{name}.scale", _np(scale.reshape(1)), "F32")
    out.items = {k: (v if t in ("F32",) else _quantize(gguf, v, t), t)
                 for k, (v, t) in out.items.items()}
    return out


@torch.no_grad()
def lora_tensors(model: Transformer) -> GGUFTensors:
    """``blk.N.<proj>.weight.lora_a`` = A [r, in] and ``.lora_b`` = g·B [out, r] (f32) of every
    HGF projection (g·B / scale for ffn_gate and ffn_up, see LORA_INSIDE_SCALE)."""
    out = GGUFTensors()
    for i in range(model.cfg.model.n_layers):
        for role in ATTENTION_PROJ + MLP_PROJ:
            mod = model.get_submodule(hgf_module(i, role))
            if mod.rank:
                a, b, _ = mod.folded_terms()
                if role in LORA_INSIDE_SCALE:  # llama.cpp: (W_t x + B'(A x))·scale, see above
                    b = b / ternary_and_scale(mod)[1]
                name = f"blk.{i}.{GGUF_NAMES[role]}.weight"
                out.add(f"{name}.lora_a", _np(a), "F32")
                out.add(f"{name}.lora_b", _np(b), "F32")
    return out


def _hparams(writer, cfg: Config) -> None:
    m = cfg.model
    hd = m.d_model // m.n_heads
    writer.add_context_length(m.max_seq_len)
    writer.add_embedding_length(m.d_model)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(m.d_ff)
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.n_heads)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(m.rope_theta)
    writer.add_layer_norm_rms_eps(m.norm_eps)
    writer.add_vocab_size(m.vocab_size)


def _write(path: Path, arch: str, tensors: GGUFTensors, kv) -> None:
    gguf = require_gguf()

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        kv(w)
        for name, (data, qtype) in tensors.items.items():
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, data, raw_dtype=None if qtype == "F32" else t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


def write_model(model: Transformer, cfg: Config, out: str | Path, packing: str = "i2",
                embeddings: str = "fp16", tokenizer_json: str | None = None,
                name: str = "hgf") -> str:
    """Write the base model (no correction) as a GGUF file; returns the architecture."""
    from hgf import __version__

    gguf = require_gguf()
    arch = gguf_arch(cfg)
    vocab = (vocab_from_tokenizer_json(tokenizer_json, cfg.model.vocab_size, "tokenizer")
             if tokenizer_json is not None else None)
    tensors = model_tensors(model, cfg, packing, embeddings)
    ftype = (gguf.LlamaFileType[f"MOSTLY_{PACKING_TYPES[packing]}"] if arch == "bitnet"
             else gguf.LlamaFileType.MOSTLY_F16)

    def kv(w) -> None:
        w.add_type("model")
        w.add_name(name)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, cfg)
        if vocab is not None:
            add_vocab(w, vocab)
        else:  # llama.cpp then loads vocab_size dummy tokens (it refuses a file without the key)
            w.add_tokenizer_model("none")
        w.add_string("hgf.version", __version__)
        w.add_string("hgf.arm", f"{cfg.model.linear}/{cfg.model.attention}")

    _write(Path(out), arch, tensors, kv)
    return arch


def write_lora(model: Transformer, cfg: Config, out: str | Path, name: str = "hgf") -> int:
    """Write an HGF model's correction as a GGUF LoRA adapter; returns the rank."""
    if cfg.model.linear != "hgf":
        raise HGFError(f"model.linear={cfg.model.linear}: only HGF models have a correction to "
                       "export as a LoRA adapter")
    arch = gguf_arch(cfg)
    rank = model.rank

    def kv(w) -> None:
        w.add_type("adapter")
        w.add_name(f"{name} correction")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(rank))  # scale = alpha / rank = 1

    _write(Path(out), arch, lora_tensors(model), kv)
    return rank


# ---------------------------------------------------------------------------------------------
# `hgf export RUN -o model.gguf`


def lora_path_for(out: str | Path) -> Path:
    """Where the adapter goes beside ``model.gguf``: ``model.lora.gguf``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".gguf") + ".lora.gguf")


def _refuse_existing(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.exists() and not force:
            raise HGFError(f"{p}: already exists (pass --force to overwrite)")


def export_run_gguf(run_dir: str | Path, out: str | Path, packing: str = "i2",
                    embeddings: str = "fp16", tokenizer: str | Path | None = None,
                    lora: bool = False, drop_correction: bool = False,
                    force: bool = False) -> dict[str, Any]:
    """``hgf export RUN -o out.gguf``. A bitnet/fp16 run -> ``out``. An HGF run -> ``out`` (the
    ternary backbone) and the correction as ``lora_path_for(out)``; with ``lora`` only the adapter
    (at ``out``); with ``drop_correction`` only the backbone, and the logit drift of dropping
    the correction is returned."""
    model, cfg = load_trained(run_dir)
    return export_model_gguf(model, cfg, out, packing, embeddings,
                             _run_tokenizer(run_dir, tokenizer), lora, drop_correction, force,
                             Path(run_dir).name)


def _run_tokenizer(run_dir: str | Path, tokenizer: str | Path | None) -> str | None:
    tok_path = Path(tokenizer) if tokenizer else Path(run_dir) / TOKENIZER_FILE
    if tokenizer and not tok_path.is_file():
        raise HGFError(f"{tok_path}: tokenizer file not found")
    return tok_path.read_text(encoding="utf-8") if tok_path.is_file() else None


def export_model_gguf(model: Transformer, cfg: Config, out: str | Path, packing: str = "i2",
                      embeddings: str = "fp16", tokenizer_json: str | None = None,
                      lora: bool = False, drop_correction: bool = False, force: bool = False,
                      name: str = "hgf") -> dict[str, Any]:
    """:func:`export_run_gguf` for a model in memory."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise HGFError(f"{out}: a GGUF output needs the .gguf extension")
    gguf_arch(cfg)  # refusals first, before anything is written
    is_hgf = cfg.model.linear == "hgf"
    if lora and drop_correction:
        raise HGFError("--lora writes only the correction and --drop-correction drops it: pick one")
    if lora and not is_hgf:
        raise HGFError(f"--lora: model.linear={cfg.model.linear} has no HGF correction to export")
    if drop_correction and not is_hgf:
        raise HGFError(f"--drop-correction: model.linear={cfg.model.linear} has no HGF correction")
    info: dict[str, Any] = {"files": []}
    if lora:
        _refuse_existing([out], force)
        info["rank"] = write_lora(model, cfg, out, name)
        info["adapter"] = out
        info["files"].append(out)
        return info
    adapter = lora_path_for(out) if is_hgf and not drop_correction else None
    _refuse_existing([out] + ([adapter] if adapter else []), force)
    info["arch"] = write_model(model, cfg, out, packing, embeddings, tokenizer_json, name)
    info["model"] = out
    info["files"].append(out)
    info["tokenizer"] = tokenizer_json is not None
    if adapter is not None:
        info["rank"] = write_lora(model, cfg, adapter, name)
        info["adapter"] = adapter
        info["files"].append(adapter)
    if drop_correction:
        from hgf.hf.bitnet_export import correction_drift

        info["drift"] = correction_drift(model)
    return info


def format_export(info: dict[str, Any], packing: str = "i2") -> str:
    """What ``hgf export`` prints after writing GGUF files."""
    lines = []
    for f in info["files"]:
        lines.append(f"{f}: {os.path.getsize(f) / 2**20:.2f} MiB")
    if "model" in info:
        what = (f"llama.cpp architecture {info['arch']}"
                + (f", ternary weights {PACKING_TYPES[packing]}" if info["arch"] == "bitnet" else ""))
        lines.append(f"  {what}; tokenizer {'included' if info['tokenizer'] else 'none'}")
    if "adapter" in info:
        lines.append(f"  HGF correction as a LoRA adapter (rank {info['rank']}, gate folded into B)")
    if "drift" in info:
        d = info["drift"]
        lines.append(f"  correction dropped (B := 0): on {d['n_tokens']} random tokens max |dlogit| "
                     f"{d['max_abs_logit_diff']:.4g}, mean KL {d['mean_kl']:.4g} nats/token, "
                     f"top-1 agreement {d['top1_agreement']:.3f}")
    run = f"llama-cli -m {info.get('model', 'model.gguf')}"
    if "adapter" in info:
        run += f" --lora {info['adapter']}"
    lines.append(f"  run it: {run} -p \"Once upon a time\" -n 64")
    return "\n".join(lines)
