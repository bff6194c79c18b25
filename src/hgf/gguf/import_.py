"""Import a llama.cpp ``bitnet`` GGUF file into an hgf BitNet model (``hgf convert x.gguf --to run``).

What is read: architecture ``bitnet`` only (anything else is one HGFError line naming it); the
hyper-parameters ``bitnet.{embedding_length, block_count, feed_forward_length, context_length,
attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base,
rope.dimension_count}``; projections stored as TQ2_0 or TQ1_0 (or float types holding ternary
values), with an optional f32 ``.scale`` multiplier.

A projection's effective weight is ``dequant(blocks) · scale``. hgf has one scale per tensor, so
every nonzero entry must have the same magnitude ``m`` (true for hgf's own files, where the
blocks hold W_t with d = 1 and ``.scale`` = m, and for convert_hf_to_gguf.py's TQ files, where
every block's d is the same f16 m); otherwise the file is refused rather than approximated. The
weights then go through hgf.hf.bitnet_import as a BitNet checkpoint with ``W_t`` and
``weight_scale = m`` (the ``mean`` convention), so the same checks and the same construction of
the latent weight apply (grouped-query K/V repeated, ``--model.linear=hgf`` overrides, ...).
llama.cpp's bitnet graph is SwiGLU with SubLN and the output head tied to ``token_embd``.

The tokenizer (``tokenizer.ggml.model = gpt2``, pre-tokenizer ``gpt-2``) is rebuilt as a
``tokenizers`` JSON; other tokenizers are left out and the reason is returned.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hgf.errors import HGFError
from hgf.gguf import require_gguf
from hgf.gguf.tokenizer import tokenizer_json_from_fields
from hgf.kernels.packing import PACKING_REGISTRY
from hgf.runs import TOKENIZER_FILE

# GGML types a ternary projection may be stored as: the packing registry's, and float types
TERNARY_TYPES = (*(p.gguf_type for p in PACKING_REGISTRY.values() if p.gguf_type),
                 "F32", "F16", "BF16")
FLOAT_TYPES = ("F32", "F16", "BF16")
NAMES = {  # GGUF name in block N -> transformers bitnet name in layer N
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_sub_norm.weight": "self_attn.attn_sub_norm.weight",
    "ffn_sub_norm.weight": "mlp.ffn_sub_norm.weight",
}
PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` of ``path``, with one-line errors."""
    gguf = require_gguf()
    path = Path(path)
    if not path.is_file():
        raise HGFError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HGFError(f"{path}: not a readable GGUF file: {first}") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(v: Any) -> float:
    """The shortest decimal of a float32 value (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(v)))


def gguf_architecture(reader) -> str | None:
    return _field(reader, "general.architecture")


def _hf_config(reader, path: Path, vocab_size: int) -> dict[str, Any]:
    """The transformers BitNetConfig keys of a ``bitnet`` GGUF's hyper-parameters."""

    def need(key: str) -> Any:
        v = _field(reader, f"bitnet.{key}")
        if v is None:
            raise HGFError(f"{path}: missing key bitnet.{key}")
        return v

    d, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(_field(reader, "bitnet.attention.head_count_kv", n_heads))
    rot = _field(reader, "bitnet.rope.dimension_count")
    if rot is not None and n_heads and int(rot) != d // n_heads:
        raise HGFError(f"{path}: bitnet.rope.dimension_count={rot} rotates part of each head; "
                       f"hgf rotates all {d // n_heads} dims")
    scaling = _field(reader, "bitnet.rope.scaling.type")
    factor = float(_field(reader, "bitnet.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in (None, "none") and not (scaling == "linear" and factor == 1.0):
        raise HGFError(f"{path}: RoPE scaling {scaling} (factor {factor}) not supported")
    return {
        "model_type": "bitnet", "hidden_size": d, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "vocab_size": vocab_size,
        "hidden_act": "silu", "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": _f32(_field(reader, "bitnet.rope.freq_base", 10000.0))},
        "tie_word_embeddings": True,
    }


def _dequantized(t, path: Path) -> np.ndarray:
    gguf = require_gguf()
    try:
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise HGFError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which hgf cannot "
                       "read") from None


def _ternary(name: str, w: np.ndarray, scale: float, path: Path) -> tuple[torch.Tensor, float]:
    """(W_t, m) with ``w·scale == W_t·m`` exactly, or a one-line refusal."""
    w = torch.from_numpy(w) * scale
    nz = w[w != 0].abs()
    if nz.numel() == 0:
        return torch.zeros_like(w), 1.0
    lo, hi = float(nz.min()), float(nz.max())
    if hi - lo > 1e-6 * hi:
        raise HGFError(f"{path}: {name} is not ternary with one scale per tensor (nonzero "
                       f"magnitudes {lo:.6g}..{hi:.6g}); hgf keeps one scale per projection")
    return torch.sign(w), float(nz.mean(dtype=torch.float64))


def gguf_state(reader, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(BitNetConfig dict, tensors under transformers bitnet names) of a ``bitnet`` GGUF."""
    arch = gguf_architecture(reader)
    if arch != "bitnet":
        raise HGFError(f"{path}: GGUF architecture {arch!r} cannot be imported (hgf imports "
                       "llama.cpp 'bitnet' files with TQ2_0/TQ1_0 weights)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise HGFError(f"{path}: missing tensor token_embd.weight")
    emb = _dequantized(tensors["token_embd.weight"], path)
    hf = _hf_config(reader, path, emb.shape[0])
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.from_numpy(emb.copy())}
    for name, t in tensors.items():
        if name == "token_embd.weight" or name.endswith(".scale"):
            continue
        if name == "output_norm.weight":
            state["model.norm.weight"] = torch.from_numpy(_dequantized(t, path).copy())
            continue
        parts = name.split(".", 2)  # blk, N, rest
        if parts[0] != "blk" or len(parts) < 3:
            state[name] = torch.zeros(0)  # bitnet_import names it as having no counterpart
            continue
        i, rest = parts[1], parts[2]
        proj = rest.removesuffix(".weight")
        if rest in NAMES:
            state[f"model.layers.{i}.{NAMES[rest]}"] = torch.from_numpy(_dequantized(t, path).copy())
        elif proj in PROJ and rest.endswith(".weight"):
            if t.tensor_type.name not in TERNARY_TYPES:
                raise HGFError(f"{path}: {name} has type {t.tensor_type.name}; hgf imports "
                               f"ternary projections stored as {', '.join(TERNARY_TYPES)}")
            s = tensors.get(f"blk.{i}.{proj}.scale")
            scale = float(_dequantized(s, path).reshape(-1)[0]) if s is not None else 1.0
            if not math.isfinite(scale) or scale <= 0:
                raise HGFError(f"{path}: blk.{i}.{proj}.scale={scale} is not a positive scale")
            w_t, m = _ternary(name, _dequantized(t, path), scale, path)
            key = f"model.layers.{i}.{PROJ[proj]}"
            state[f"{key}.weight"], state[f"{key}.weight_scale"] = w_t, torch.tensor([m])
        else:
            state[name] = torch.zeros(0)
    return hf, state


def import_gguf(path: str | Path, overrides: list[str] | None = None):
    """(model, cfg, info) of a ``bitnet`` GGUF; ``info["tokenizer"]`` is a rebuilt tokenizer.json
    (a temporary file, removed at exit) or None, ``info["tokenizer_note"]`` says how or why not."""
    from hgf.hf.bitnet_import import import_bitnet_state

    path = Path(path)
    reader = read_gguf(path)
    hf, state = gguf_state(reader, path)
    model, cfg, info = import_bitnet_state(hf, state, str(path), path, "mean", overrides)
    info = {"n_projections": info["n_projections"], "zero_fraction": info["zero_fraction"],
            "kv_heads_repeated": info["kv_heads_repeated"]}
    text, note = tokenizer_json_from_fields(
        _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre"),
        _field(reader, "tokenizer.ggml.tokens", []), _field(reader, "tokenizer.ggml.token_type", []),
        _field(reader, "tokenizer.ggml.merges", []))
    info["tokenizer"], info["tokenizer_note"] = None, note
    if text is not None:
        tmp = Path(tempfile.mkdtemp(prefix="hgf-gguf-tok-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        info["tokenizer"] = tmp / TOKENIZER_FILE
        info["tokenizer"].write_text(text, encoding="utf-8")
    return model, cfg, info
