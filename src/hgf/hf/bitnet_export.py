"""Export an hgf model as a transformers ``bitnet`` checkpoint (the inverse of hgf.hf.bitnet_import).

Every block projection with latent weight ``W`` is stored as hgf's own ternarization of it,
``s_w = 1/max(mean|W|, eps)``, ``W_t = clamp(round(W·s_w), -1, 1)``:

    weight        pack_ternary_along_out(W_t): uint8 [ceil(out/4), in] (layout in hgf.hf.bitnet_import)
    weight_scale  s_w, float32 [1]: the inverse convention of transformers' ``BitLinear``,
                  y = (x_int @ W_tᵀ) / (s_x · weight_scale), which is hgf's inference form.

Norms, embeddings and ``lm_head`` keep their values under the LLaMA/BitNet names (``lm_head`` is
left out when tied: ``BitNetForCausalLM`` ties it to ``embed_tokens``). ``config.json`` holds the
BitNetConfig keys with ``num_key_value_heads = model.n_kv_heads`` (= ``num_attention_heads``
unless the model has grouped-query attention) and ``quantization_config`` {bitnet, bitlinear,
offline}.

What the format can hold: standard attention; SubLN on (transformers' BitNet always applies
``attn_sub_norm`` and ``ffn_sub_norm``); 8-bit absmax activations with eps 1e-5 (fixed in
transformers' ``BitLinear``); projection widths that are multiples of 4 (``BitLinear`` allocates
``out // 4`` packed rows). Dense arms have no ternary weights and differential attention has no
counterpart; both are refused, as is everything else outside that list.

HGF models. An HGFLinear computes ``y = μ·T(x) + g·B(A x)`` (``μ = 1`` additive, ``1 - g`` convex
fusion) and the format has no correction path, so an HGF model is refused unless the correction is
pruned, ``B := 0`` (METHOD §7), which leaves ``μ·T(x)``: ``W_t`` unchanged, ``weight_scale = s_w/μ``.
:func:`correction_drift` measures what the pruning costs on random token sequences.
"""

from __future__ import annotations

from typing import Any

import torch

from hgf.config import Config, subln_enabled
from hgf.errors import HGFError
from hgf.hf.bitnet_import import (
    MLP_ACT,
    PER_BYTE,
    hgf_proj_name,
    pack_ternary_along_out,
    plain_names,
    proj_name,
)
from hgf.model.hgf_linear import hgf_layers
from hgf.model.linear import ATTENTION_PROJ, MLP_PROJ
from hgf.model.quant import BitLinear, ternarize
from hgf.model.transformer import Transformer

HIDDEN_ACT = {ours: theirs for theirs, ours in MLP_ACT.items() if theirs != "swish"}  # relu2, swiglu
TF_ACT_EPS, TF_ACT_BITS = 1e-5, 8  # transformers' BitLinear.activation_quant
QUANTIZATION_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}


def check_exportable(cfg: Config, drop_correction: bool = False) -> None:
    """Raise a one-line HGFError when ``cfg`` cannot be written as a BitNet checkpoint."""
    m, q = cfg.model, cfg.quant
    if m.linear == "dense":
        raise HGFError("model.linear=dense: a dense (fp16) model has no ternary weights to store in "
                       "the bitnet format")
    if m.linear in ("tequila", "sherry"):
        raise HGFError(f"model.linear={m.linear}: transformers' BitNet has no dead-zone bias / "
                       "3:4 rule; export the hgf packed file instead")
    if m.linear == "ptqtp":
        raise HGFError("model.linear=ptqtp: the bitnet format holds one ternary plane per "
                       "projection, PTQTP two; write it with `hgf export` (the hgf packed file)")
    if m.attention != "standard":
        raise HGFError(f"model.attention={m.attention}: transformers' BitNet has standard attention "
                       "only (differential attention cannot be represented)")
    if not subln_enabled(m):
        raise HGFError("model.subln=off: transformers' BitNet always applies attn_sub_norm and "
                       "ffn_sub_norm, so a model without SubLN cannot be represented")
    if m.linear == "hgf" and not drop_correction:
        raise HGFError("model.linear=hgf: the bitnet format has no low-rank correction path; pass "
                       "--drop-correction to export the ternary backbone only (B := 0)")
    if (q.act_bits, q.act_eps) != (TF_ACT_BITS, TF_ACT_EPS):
        raise HGFError(f"quant.act_bits={q.act_bits}, quant.act_eps={q.act_eps}: transformers' "
                       f"BitLinear quantizes activations with {TF_ACT_BITS} bits and eps {TF_ACT_EPS}")
    for key, width in (("model.d_model", m.d_model), ("model.d_ff", m.d_ff)):
        if width % PER_BYTE:
            raise HGFError(f"{key}={width}: transformers' BitLinear needs projection widths that are "
                           f"multiples of {PER_BYTE} (it allocates out // {PER_BYTE} packed rows)")


def bitnet_config(cfg: Config, eos_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of the exported checkpoint (transformers' BitNetConfig keys)."""
    m = cfg.model
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads, "hidden_act": HIDDEN_ACT[m.mlp],
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
        "dtype": "float32", "quantization_config": dict(QUANTIZATION_CONFIG),
    }


def _packed(mod: BitLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed W_t, weight_scale [1]) of one projection; an HGFLinear loses its correction."""
    w_t, s = ternarize(mod.weight, mod.weight_eps)
    if mod.rank:  # a corrected projection; convex fusion: (1 - g) folded into the scale
        s = s.cpu() / mod.folded_terms()[2]
    return pack_ternary_along_out(w_t), s.reshape(1).float()


@torch.no_grad()
def bitnet_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (contiguous, on the CPU) of a model that passed :func:`check_exportable`."""
    m = model.cfg.model
    sd: dict[str, torch.Tensor] = {}
    for i in range(m.n_layers):
        for role in ATTENTION_PROJ + MLP_PROJ:
            mod = model.get_submodule(hgf_proj_name(i, role).removesuffix(".weight"))
            key = f"model.layers.{i}.{proj_name(role)}"
            sd[f"{key}.weight"], sd[f"{key}.weight_scale"] = _packed(mod)
    ours = model.state_dict()
    for name, theirs in plain_names(m).items():
        sd[theirs] = ours[name].float()
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


@torch.no_grad()
def correction_drift(model: Transformer, n_seqs: int = 4, seq_len: int = 64,
                     seed: int = 0) -> dict[str, float]:
    """How far pruning every correction (B := 0) moves the logits on ``n_seqs`` random token
    sequences: max |Δlogit|, mean KL(model ‖ backbone) in nats per token, top-1 agreement."""
    m = model.cfg.model
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, m.vocab_size, (n_seqs, min(seq_len, m.max_seq_len)), generator=gen)
    idx = idx.to(device)  # [n, t]
    full = model(idx).float()  # [n, t, V]
    saved = [(layer, layer.B.detach().clone()) for _, layer in hgf_layers(model)]
    try:
        for layer, _ in saved:
            layer.B.zero_()
        pruned = model(idx).float()
    finally:
        for layer, b in saved:
            layer.B.copy_(b)
    logp, logq = full.log_softmax(-1), pruned.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [n, t]
    return {"max_abs_logit_diff": float((full - pruned).abs().max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((full.argmax(-1) == pruned.argmax(-1)).float().mean()),
            "n_tokens": idx.numel()}
