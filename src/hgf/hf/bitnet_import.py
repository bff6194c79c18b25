"""Import checkpoints in the transformers ``bitnet`` format into an hgf model (torch + safetensors).

Packed format (transformers ``integrations/bitnet.py``): a ternary weight ``W_t ∈ {-1,0,1}^{out×in}``
is stored as uint8 ``[R, in]`` with ``R = ceil(out/4)``; packed row ``r`` holds rows
``r, r+R, r+2R, r+3R`` in bit pairs 0-1, 2-3, 4-5, 6-7 as the code ``value + 1`` (rows past ``out``
are code 0). Next to it, ``weight_scale`` holds one scale per tensor, in one of two conventions:

    inverse  (``BitLinear``)      weight_scale = 1/mean|W|,  y = (x_int @ W_tᵀ) / (s_x · weight_scale)
    mean     (``AutoBitLinear``)  weight_scale = mean|W|,    y = (x_q @ W_tᵀ) · weight_scale

``auto`` takes the convention from ``quantization_config.linear_class`` (bitlinear -> inverse,
autobitlinear -> mean) and otherwise from the magnitudes: every scale <= 0.5 -> mean, every scale
>= 2 -> inverse; anything else is ambiguous and needs an explicit ``--scale-convention``.

Latent weight. hgf keeps a latent weight ``W`` and re-quantizes it on every forward,
``s_w = 1/mean|W|``, ``W_t = clamp(round(W·s_w), -1, 1)``, effective weight ``W_t/s_w``. With
``m = mean|W_orig|`` (the checkpoint's scale) and ``z`` the zero fraction of ``W_t``:
  * ``W = W_t·m`` reproduces ``W_t`` exactly (nonzero entries map to ±1/(1-z), |.| >= 1, clamp ±1)
    but ``mean|W| = m(1-z)``: the effective weight comes out ``(1-z)`` times too small;
  * ``W = W_t·m/(1-z)`` gives ``mean|W| = m``: ``W_t`` exactly (entries ±1/(1-z) again) and the
    effective weight ``W_t·m`` up to the float32 rounding of the mean (a few ulps). This is the
    construction used (an all-zero tensor stays all zero).
A dense float ``weight`` without ``weight_scale`` (online/QAT checkpoints) is already a latent weight
and is taken as is; a float ``weight`` with a ``weight_scale`` must hold ternary values.

Architecture: LLaMA-like names (``model.layers.N.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, optional
``attn_sub_norm``/``ffn_sub_norm`` -> ``model.subln``, ``embed_tokens``, ``norm``, ``lm_head``).
Grouped-query attention is converted exactly to multi-head attention by repeating each K/V head's
rows ``n_heads/n_kv_heads`` times (mean|W| is unchanged by the repetition). ``relu2`` ->
``model.mlp = relu2``, ``silu`` -> ``swiglu``. With ``model.linear = hgf`` every correction starts at
``B = 0``, so the HGF model equals the BitNet exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hgf.config import (
    Config,
    ModelConfig,
    TrainConfig,
    build_config,
    parse_overrides,
    read_json,
    subln_enabled,
)
from hgf.errors import HGFError
from hgf.model.hgf_linear import CORRECTION_PARAMS
from hgf.model.linear import ATTENTION_PROJ, MLP_PROJ
from hgf.model.transformer import Transformer, build_model

PER_BYTE = 4
CONVENTIONS = ("auto", "mean", "inverse")
LINEAR_CLASS_CONVENTION = {"bitlinear": "inverse", "autobitlinear": "mean"}
MLP_ACT = {"relu2": "relu2", "silu": "swiglu", "swish": "swiglu"}
DEFAULT_THETA = {"bitnet": 500000.0}  # transformers' BitNetConfig default; LLaMA-likes use 10000
NORMS = {  # hgf name in a block -> checkpoint name in a layer
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "attn.subln": "self_attn.attn_sub_norm", "mlp.subln": "mlp.ffn_sub_norm",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# Packing


def pack_ternary_along_out(w_t: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` values in {-1, 0, 1} -> uint8 ``[ceil(out/4), in]`` (the layout above:
    packed along the *output* dim, unlike hgf's own packings, hgf.kernels.packing)."""
    out, inp = w_t.shape
    rows = math.ceil(out / PER_BYTE)
    codes = torch.zeros(PER_BYTE * rows, inp, dtype=torch.uint8, device=w_t.device)
    codes[:out] = (w_t + 1).to(torch.uint8)
    codes = codes.view(PER_BYTE, rows, inp)  # [4, R, in]: codes[k, r] is row k·R + r
    return codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6


def unpack_ternary_along_out(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """uint8 ``[R, in]`` -> float32 ``[out_features, in]`` in {-1, 0, 1} (code 3 is an error)."""
    shifts = torch.arange(0, 2 * PER_BYTE, 2, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(0) >> shifts.view(-1, 1, 1)) & 3  # [4, R, in]
    if bool((codes == 3).any()):
        raise ValueError("invalid 2-bit code 3 (only 0, 1, 2 = -1, 0, +1 exist)")
    return codes.reshape(-1, packed.shape[1])[:out_features].float() - 1  # [out, in]


def latent_weight(w_t: torch.Tensor, mean_abs: float) -> torch.Tensor:
    """The latent ``W = W_t·m/(1-z)``: hgf's ternarize gives back ``W_t`` and ``s_w = 1/m``."""
    nonzero = w_t.ne(0).float().mean()
    if nonzero == 0:
        return torch.zeros_like(w_t, dtype=torch.float32)
    return w_t.float() * (mean_abs / nonzero)


# ---------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of ``model.safetensors`` (or a sharded index) in ``path``."""
    path = Path(path)
    cfg_file = path / "config.json"
    hf_cfg = read_json(cfg_file, "not found (a BitNet checkpoint folder holds config.json and "
                                 "model.safetensors)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    return hf_cfg, load_shards(path, files)


def load_shards(path: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files`` in folder ``path``; a missing or corrupt shard
    is one HGFError line naming it."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(path / f)))
        except FileNotFoundError:
            raise HGFError(f"{path / f}: weights file not found") from None
        except Exception as e:  # safetensors raises its own error types
            raise HGFError(f"{path / f}: corrupt weights file: {str(e).splitlines()[0]}") from None
    return state


def config_from_bitnet(hf: dict[str, Any], has_subln: bool, source: str,
                       overrides: list[str] | None = None) -> Config:
    """The hgf Config of a BitNet checkpoint; ``overrides`` may change ``model.linear``
    (bitlinear | hgf) and the non-architecture sections, not the architecture."""

    def need(key: str) -> Any:
        if key not in hf:
            raise HGFError(f"{source}: missing key {key!r}")
        return hf[key]

    d, n_heads = need("hidden_size"), need("num_attention_heads")
    if (hf.get("head_dim") or d // n_heads) * n_heads != d:
        raise HGFError(f"{source}: head_dim={hf['head_dim']} x heads != hidden_size={d} "
                       "(hgf needs head_dim = hidden_size / num_attention_heads)")
    act = hf.get("hidden_act", "relu2")
    if act not in MLP_ACT:
        raise HGFError(f"{source}: hidden_act={act!r} not supported (known: {', '.join(MLP_ACT)})")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or hf.get("rope_scaling"):
        raise HGFError(f"{source}: RoPE type {rope_type!r}/rope_scaling not supported (only default)")
    theta = rope.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA.get(hf.get("model_type"), 1e4)))
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HGFError(f"{source}: {key}=true not supported (hgf projections have no bias)")
    if (hf.get("quantization_config") or {}).get("use_rms_norm"):
        raise HGFError(f"{source}: quantization_config.use_rms_norm (an RMSNorm inside every "
                       "linear) has no hgf counterpart")
    model = dict(
        vocab_size=need("vocab_size"), d_model=d, n_layers=need("num_hidden_layers"),
        n_heads=n_heads, d_ff=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048), linear="bitlinear",
        attention="standard", mlp=MLP_ACT[act], subln="on" if has_subln else "off",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    )
    seq_len = min(TrainConfig.seq_len, model["max_seq_len"])  # the default must fit the model
    layers = [({"model": model, "train": {"seq_len": seq_len}}, source)]
    if overrides:
        over = parse_overrides(overrides)
        fixed = [f"{sec}.{k}" for sec, body in over.items() for k in body
                 if sec == "quant" or (sec == "model" and k != "linear")]
        if fixed:
            raise HGFError(f"command line: {fixed[0]} is fixed by the BitNet checkpoint")
        layers.append((over, "command line"))
    cfg = build_config(*layers)
    if cfg.model.linear not in ("bitlinear", "hgf"):
        raise HGFError(f"command line: model.linear={cfg.model.linear!r}: a BitNet imports as "
                       "bitlinear or hgf")
    if cfg.model.linear == "hgf" and (cfg.hgf.fusion, cfg.hgf.init) != ("additive", "kaiming"):
        raise HGFError("command line: an imported BitNet needs hgf.fusion=additive and "
                       "hgf.init=kaiming (B = 0) to equal the checkpoint")
    return cfg


def detect_scale_convention(hf: dict[str, Any], scales: list[float]) -> tuple[str, str]:
    """(convention, reason) for ``auto`` (rules in the module docstring)."""
    linear_class = (hf.get("quantization_config") or {}).get("linear_class")
    if linear_class in LINEAR_CLASS_CONVENTION:
        return LINEAR_CLASS_CONVENTION[linear_class], f"quantization_config.linear_class={linear_class}"
    lo, hi = min(scales), max(scales)
    if hi <= 0.5:
        return "mean", f"all weight_scale values <= 0.5 ({lo:.3g}..{hi:.3g})"
    if lo >= 2:
        return "inverse", f"all weight_scale values >= 2 ({lo:.3g}..{hi:.3g})"
    raise HGFError(f"cannot tell whether weight_scale holds mean|W| or 1/mean|W| (values "
                   f"{lo:.3g}..{hi:.3g}, no quantization_config.linear_class); pass "
                   "--scale-convention mean or inverse")


# ---------------------------------------------------------------------------------------------
# Import


def proj_name(role: str) -> str:
    """Checkpoint name of a block projection, without ``model.layers.N.``."""
    return f"self_attn.{role}" if role in ATTENTION_PROJ else f"mlp.{role}"


def hgf_proj_name(layer: int, role: str) -> str:
    """hgf state-dict name of a block projection's weight."""
    return f"layers.{layer}.{'attn' if role in ATTENTION_PROJ else 'mlp'}.{role}.weight"


def _projection(state: dict[str, torch.Tensor], key: str, shape: tuple[int, int],
                convention: str) -> torch.Tensor:
    """The hgf latent weight ``[out, in]`` of the checkpoint projection ``key`` (without .weight)."""
    w, scale = state[f"{key}.weight"], state.get(f"{key}.weight_scale")
    out, inp = shape
    if w.dtype == torch.uint8:
        want = (math.ceil(out / PER_BYTE), inp)
        if tuple(w.shape) != want:
            raise HGFError(f"{key}.weight: packed shape {tuple(w.shape)}, expected {want} for a "
                           f"[{out}, {inp}] projection")
        try:
            w_t = unpack_ternary_along_out(w, out)
        except ValueError as e:
            raise HGFError(f"{key}.weight: {e}") from None
    elif scale is None:
        if tuple(w.shape) != shape:
            raise HGFError(f"{key}.weight: shape {tuple(w.shape)}, expected {shape}")
        return w.float()  # already a latent weight
    else:
        w_t = w.float()
        if tuple(w.shape) != shape or not bool(((w_t == 0) | (w_t.abs() == 1)).all()):
            raise HGFError(f"{key}.weight: a float weight with a weight_scale must be ternary {shape}")
    if scale is None:
        raise HGFError(f"{key}.weight_scale: missing (a packed weight needs its scale)")
    s = float(scale.float().reshape(-1)[0])
    if not math.isfinite(s) or s <= 0:
        raise HGFError(f"{key}.weight_scale: {s} is not a positive finite scale")
    return latent_weight(w_t, s if convention == "mean" else 1.0 / s)


def plain_names(m: ModelConfig) -> dict[str, str]:
    """hgf name -> checkpoint name of every full-precision tensor (embeddings, norms, an untied
    head); the sub-norms only when ``m.subln`` is on."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not m.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(m.n_layers):
        for ours, theirs in NORMS.items():
            if subln_enabled(m) or "subln" not in ours:
                names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def _repeat_heads(w: torch.Tensor, n_kv: int, n_rep: int) -> torch.Tensor:
    """K/V rows of ``n_kv`` heads ``[n_kv·hd, in]`` -> ``[n_kv·n_rep·hd, in]``, head i repeated
    ``n_rep`` times in a row (query head j reads K/V head j // n_rep)."""
    hd = w.shape[0] // n_kv
    return w.view(n_kv, hd, -1).repeat_interleave(n_rep, dim=0).reshape(n_kv * n_rep * hd, -1)


def import_bitnet(path: str | Path, scale_convention: str = "auto",
                  overrides: list[str] | None = None) -> tuple[Transformer, Config, dict[str, Any]]:
    """Read a BitNet checkpoint folder into an hgf model; returns (model, cfg, info)."""
    if scale_convention not in CONVENTIONS:
        raise HGFError(f"scale convention {scale_convention!r} is not one of {', '.join(CONVENTIONS)}")
    hf, state = read_checkpoint(path)
    return import_bitnet_state(hf, state, str(Path(path) / "config.json"), path, scale_convention,
                               overrides)


def import_bitnet_state(hf: dict[str, Any], state: dict[str, torch.Tensor], source: str,
                        path: str | Path, scale_convention: str = "auto",
                        overrides: list[str] | None = None
                        ) -> tuple[Transformer, Config, dict[str, Any]]:
    """:func:`import_bitnet` of a config dict and tensors already read (``source`` and ``path``
    name them in errors); hgf.gguf.import_ feeds GGUF files through it."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    has_subln = any(k.endswith("attn_sub_norm.weight") for k in state)
    cfg = config_from_bitnet(hf, has_subln, source, overrides)
    m = cfg.model
    n_kv = hf.get("num_key_value_heads") or m.n_heads
    if m.n_heads % n_kv:
        raise HGFError(f"{source}: num_attention_heads={m.n_heads} is not a multiple of "
                       f"num_key_value_heads={n_kv}")
    hd = m.d_model // m.n_heads
    shapes = {"q_proj": (m.d_model, m.d_model), "k_proj": (n_kv * hd, m.d_model),
              "v_proj": (n_kv * hd, m.d_model), "o_proj": (m.d_model, m.d_model),
              "gate_proj": (m.d_ff, m.d_model), "up_proj": (m.d_ff, m.d_model),
              "down_proj": (m.d_model, m.d_ff)}

    proj_keys = [(i, r, f"model.layers.{i}.{proj_name(r)}")
                 for i in range(m.n_layers) for r in ATTENTION_PROJ + MLP_PROJ]
    missing = [f"{k}.weight" for _, _, k in proj_keys if f"{k}.weight" not in state]
    if missing:
        raise HGFError(f"{path}: checkpoint lacks {len(missing)} projections, e.g. {missing[0]}")
    scales = [float(state[f"{k}.weight_scale"].float().reshape(-1)[0])
              for _, _, k in proj_keys if f"{k}.weight_scale" in state]
    reason = "given"
    if scale_convention == "auto":
        scale_convention, reason = (detect_scale_convention(hf, scales) if scales
                                    else ("mean", "no weight_scale tensors (latent weights)"))

    used: set[str] = set()
    ours: dict[str, torch.Tensor] = {}
    zeros = total = 0
    for i, role, key in proj_keys:
        w = _projection(state, key, shapes[role], scale_convention)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        if role in ("k_proj", "v_proj") and n_kv != m.n_heads:
            w = _repeat_heads(w, n_kv, m.n_heads // n_kv)
        ours[hgf_proj_name(i, role)] = w
        used.update({f"{key}.weight", f"{key}.weight_scale"})
    if m.tie_embeddings and "lm_head.weight" in state:  # a tied head stored twice must be the embedding
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise HGFError(f"{source}: tie_word_embeddings=true but lm_head.weight differs from "
                           "model.embed_tokens.weight")
        used.add("lm_head.weight")
    for ours_name, theirs in plain_names(m).items():
        if theirs not in state:
            raise HGFError(f"{path}: checkpoint lacks {theirs}")
        ours[ours_name] = state[theirs].float()
        used.add(theirs)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise HGFError(f"{path}: {len(unexpected)} tensors have no hgf counterpart, "
                       f"e.g. {unexpected[0]}")

    model = build_model(cfg)
    try:
        missing_keys, _ = model.load_state_dict(ours, strict=False)
    except RuntimeError as e:
        raise HGFError(f"{path}: tensor shapes do not match the config: "
                       f"{str(e).splitlines()[-1].strip()}") from None
    tied = {"lm_head.weight"} if m.tie_embeddings else set()  # shares tok_emb.weight
    left = [k for k in missing_keys if k.rsplit(".", 1)[-1] not in CORRECTION_PARAMS
            and k not in tied]
    if left:
        raise HGFError(f"{path}: no checkpoint tensor for {left[0]}")
    info = {"scale_convention": scale_convention, "reason": reason,
            "zero_fraction": zeros / max(total, 1), "kv_heads_repeated": m.n_heads // n_kv,
            "n_projections": len(proj_keys)}
    return model.eval(), cfg, info
