"""Llama-architecture checkpoints <-> hgf dense models (torch + safetensors; no transformers needed).

A Llama folder is what ``LlamaForCausalLM.save_pretrained`` writes (Llama 2/3, TinyLlama, SmolLM
and the like): ``config.json`` (``model_type = "llama"``), ``model.safetensors`` or a sharded
``model.safetensors.index.json``, usually ``tokenizer.json``. It maps one to one onto an hgf
``model.linear = dense`` model with standard attention, SwiGLU, no SubLN:

    model.embed_tokens.weight                 tok_emb.weight
    model.layers.N.self_attn.{q,k,v,o}_proj   layers.N.attn.{q,k,v,o}_proj
    model.layers.N.mlp.{gate,up,down}_proj    layers.N.mlp.{gate,up,down}_proj
    model.layers.N.input_layernorm            layers.N.attn_norm
    model.layers.N.post_attention_layernorm   layers.N.mlp_norm
    model.norm / lm_head                      norm / lm_head (absent when tied)

Config: ``hidden_size`` -> d_model, ``num_hidden_layers`` -> n_layers, ``num_attention_heads`` ->
n_heads, ``num_key_value_heads`` -> n_kv_heads (grouped-query attention), ``intermediate_size``
-> d_ff, ``max_position_embeddings`` -> max_seq_len, ``rope_theta`` (or
``rope_parameters.rope_theta``), ``rms_norm_eps`` -> norm_eps, ``tie_word_embeddings``.

RoPE layout: transformers' Llama rotates with ``rotate_half`` (the two halves of each head,
"NEOX style"; checkpoints converted from Meta's interleaved layout were permuted into it by
transformers' conversion script). hgf's ``apply_rope`` is the same half-split rotation with the
same frequencies ``θ^(-2i/d)``, so the weights are copied without any permutation (the logit test
in tests/test_llama_import.py checks it against transformers).

Refused with one line naming the feature: other architectures and model types, biases
(``attention_bias``/``mlp_bias``), activations other than SiLU, RoPE scaling of any type
(``linear``, ``dynamic``, ``yarn``, ``llama3``, ...), ``head_dim`` other than
hidden_size/num_attention_heads, quantized checkpoints, ``.bin`` (pickle) weights.

Tokenizer: hgf's data pipeline separates stories with ``<|endoftext|>`` and adds it when a
tokenizer lacks it, which would need one id more than a Llama embedding has. So the run's
``tokenizer.json`` is the checkpoint's with its end-of-sequence token (``eos_token_id``, e.g.
``</s>``) renamed ``<|endoftext|>`` when the vocabulary has no ``<|endoftext|>``: same ids, same
tokenization of text (the literal text ``</s>`` is no longer special).

Export (``hgf convert RUN --to llama OUT``) is the inverse for a model of exactly that shape.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hgf.config import Config, TrainConfig, build_config, kv_heads, read_json, subln_enabled
from hgf.data.sources import EOT
from hgf.errors import HGFError
from hgf.hf import hf_tokenizer
from hgf.hf.bitnet_import import hgf_proj_name, load_shards, plain_names, proj_name
from hgf.model.linear import ATTENTION_PROJ, MLP_PROJ
from hgf.model.transformer import Transformer, build_model
from hgf.runs import MODEL_FILE, TOKENIZER_FILE, output_dir

MODEL_TYPE, ARCHITECTURE = "llama", "LlamaForCausalLM"
DEFAULT_EPS = 1e-6  # transformers' LlamaConfig default
DEFAULT_THETA = 10000.0
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_llama(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == MODEL_TYPE or ARCHITECTURE in (hf.get("architectures") or [])


def unsupported_architecture(hf: dict[str, Any], source: str) -> HGFError:
    """The one-line error for a transformers config.json that is not a Llama checkpoint."""
    what = f"model_type {hf.get('model_type')!r}"
    if hf.get("architectures"):
        what += f" ({', '.join(map(str, hf['architectures']))})"
    return HGFError(f"{source}: {what} is not supported; hgf imports Llama-architecture "
                    f"checkpoints (model_type llama, {ARCHITECTURE}), BitNet checkpoints and "
                    "its own runs and Hugging Face folders")


# ---------------------------------------------------------------------------------------------
# Config


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for d in (rope, scaling):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise HGFError(f"{source}: RoPE scaling rope_type={kind!r} is not supported (only "
                           "default RoPE)")
    if scaling and any(k not in ("rope_type", "type", "rope_theta") for k in scaling):
        raise HGFError(f"{source}: rope_scaling={scaling} is not supported (only default RoPE)")
    return float(rope.get("rope_theta", scaling.get("rope_theta",
                                                    hf.get("rope_theta", DEFAULT_THETA))))


def config_from_llama(hf: dict[str, Any], source: str) -> Config:
    """The hgf Config (a dense model) of a Llama ``config.json``; one-line errors otherwise."""
    if hf.get("model_type") != MODEL_TYPE:
        raise unsupported_architecture(hf, source)
    archs = hf.get("architectures") or [ARCHITECTURE]
    if archs != [ARCHITECTURE]:
        raise HGFError(f"{source}: architectures {archs} not supported (only {ARCHITECTURE})")

    def need(key: str) -> Any:
        if key not in hf:
            raise HGFError(f"{source}: missing key {key!r}")
        return hf[key]

    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise HGFError(f"{source}: quantized checkpoint (quantization_config {method!r}) not "
                       "supported; import the full-precision model")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HGFError(f"{source}: {key}=true not supported (hgf projections have no bias)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HGFError(f"{source}: hidden_act={act!r} not supported (only silu: SwiGLU)")
    d, n_heads = need("hidden_size"), need("num_attention_heads")
    n_kv = hf.get("num_key_value_heads") or n_heads
    if hf.get("head_dim") not in (None, d // n_heads) or d % n_heads:
        raise HGFError(f"{source}: head_dim={hf.get('head_dim')} with hidden_size={d} and "
                       f"{n_heads} heads not supported (hgf needs head_dim = hidden_size / heads)")
    if n_heads % n_kv:
        raise HGFError(f"{source}: num_attention_heads={n_heads} is not a multiple of "
                       f"num_key_value_heads={n_kv}")
    theta = _rope_theta(hf, source)
    model = dict(
        vocab_size=need("vocab_size"), d_model=d, n_layers=need("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=0 if n_kv == n_heads else n_kv,
        d_ff=need("intermediate_size"), max_seq_len=hf.get("max_position_embeddings", 2048),
        linear="dense", attention="standard", mlp="swiglu", subln="off",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", DEFAULT_EPS)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    seq_len = min(TrainConfig.seq_len, model["max_seq_len"])  # the default must fit the model
    return build_config(({"model": model, "train": {"seq_len": seq_len}}, source))


# ---------------------------------------------------------------------------------------------
# Import


def read_llama(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of a Llama folder (single or sharded safetensors)."""
    path = Path(path)
    hf = read_json(path / "config.json", "not found (a Llama folder holds config.json and "
                                         "model.safetensors)")
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HGFError(f"{index}: malformed index (no weight_map)")
        files = sorted(set(weight_map.values()))
    elif (path / MODEL_FILE).is_file():
        files = [MODEL_FILE]
    elif any(path.glob("*.bin")):
        raise HGFError(f"{path}: only pickled .bin weights; hgf reads safetensors (re-save with "
                       "save_pretrained(..., safe_serialization=True))")
    else:
        raise HGFError(f"{path / MODEL_FILE}: weights file not found")
    state = load_shards(path, files)
    return hf, {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}


def llama_names(m) -> dict[str, str]:
    """hgf state-dict name -> Llama checkpoint name of every tensor of a dense model."""
    names = {hgf_proj_name(i, role): f"model.layers.{i}.{proj_name(role)}.weight"
             for i in range(m.n_layers) for role in ATTENTION_PROJ + MLP_PROJ}
    names.update(plain_names(m))  # embeddings, norms (SubLN is off), untied head
    return names


def import_llama(path: str | Path) -> tuple[Transformer, Config, dict[str, Any]]:
    """Read a Llama folder into an hgf dense model; returns (model, cfg, info) where
    ``info["tokenizer"]`` is the run's tokenizer file (see the module docstring) or None."""
    path = Path(path)
    hf, state = read_llama(path)
    source = str(path / "config.json")
    cfg = config_from_llama(hf, source)
    m = cfg.model
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, theirs in llama_names(m).items():
        if theirs not in state:
            raise HGFError(f"{path}: checkpoint lacks {theirs}")
        ours[name] = state[theirs].float()
        used.add(theirs)
    if m.tie_embeddings and "lm_head.weight" in state:  # a tied head stored twice
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise HGFError(f"{source}: tie_word_embeddings=true but lm_head.weight differs from "
                           "model.embed_tokens.weight")
        used.add("lm_head.weight")
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise HGFError(f"{path}: {len(unexpected)} tensors have no hgf counterpart, "
                       f"e.g. {unexpected[0]}")
    model = build_model(cfg, device="meta")
    try:
        missing, _ = model.load_state_dict(ours, strict=False, assign=True)
    except RuntimeError as e:
        raise HGFError(f"{path}: tensor shapes do not match config.json: "
                       f"{str(e).splitlines()[-1].strip()}") from None
    if m.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    left = [k for k in missing if not (m.tie_embeddings and k == "lm_head.weight")]
    if left:  # cannot happen: llama_names covers the state dict
        raise HGFError(f"{path}: no checkpoint tensor for {left[0]}")
    model.rope_cos, model.rope_sin = _rope(cfg)
    info = {"kv_heads": kv_heads(m), "tokenizer": run_tokenizer(path, hf)}
    return model.eval(), cfg, info


def _rope(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    from hgf.model.attention import rope_cache

    m = cfg.model
    return rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _rename(node: Any, old: str, new: str) -> Any:
    """``node`` (parsed JSON) with every string and key equal to ``old`` replaced by ``new``."""
    if isinstance(node, dict):
        return {(new if k == old else k): _rename(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename(v, old, new) for v in node]
    return new if node == old else node


def adapt_tokenizer(tok: dict[str, Any], eos_id: int | None) -> tuple[dict[str, Any], str | None]:
    """(tokenizer JSON, renamed token or None): the end-of-sequence special token ``eos_id``
    renamed ``<|endoftext|>`` when the tokenizer has no ``<|endoftext|>``."""
    added = tok.get("added_tokens") or []
    vocab = (tok.get("model") or {}).get("vocab")
    if any(a.get("content") == EOT for a in added) or (isinstance(vocab, dict) and EOT in vocab):
        return tok, None
    old = next((a.get("content") for a in added if a.get("id") == eos_id), None)
    if old is None:
        return tok, None
    return _rename(tok, old, EOT), old


_TMP: list[str] = []


def run_tokenizer(path: Path, hf: dict[str, Any]) -> Path | None:
    """The tokenizer file a run imported from ``path`` gets (a temporary adapted copy when the
    end-of-sequence token is renamed), or None when the folder has no tokenizer.json."""
    src = path / TOKENIZER_FILE
    if not src.is_file():
        return None
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    try:
        tok = json.loads(src.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HGFError(f"{src}: malformed tokenizer JSON: {e}") from None
    tok, renamed = adapt_tokenizer(tok, eos if isinstance(eos, int) else None)
    if renamed is None:
        return src
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="hgf-llama-tokenizer-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    out = Path(tempfile.mkdtemp(dir=_TMP[0])) / TOKENIZER_FILE
    out.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Export


def check_llama_exportable(cfg: Config) -> None:
    """Raise a one-line HGFError unless ``cfg`` is a model a Llama checkpoint can hold."""
    m = cfg.model
    if m.linear != "dense":
        raise HGFError(f"model.linear={m.linear}: a Llama checkpoint holds full-precision "
                       "projections; write ternary models with --to bitnet or `hgf export`")
    if m.attention != "standard":
        raise HGFError(f"model.attention={m.attention}: Llama has standard attention only")
    if m.mlp != "swiglu":
        raise HGFError(f"model.mlp={m.mlp}: Llama's MLP is SwiGLU")
    if subln_enabled(m):
        raise HGFError("model.subln=on: Llama has no SubLN norms")


def llama_config(cfg: Config, eos_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of the exported checkpoint (transformers' LlamaConfig keys)."""
    m = cfg.model
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": kv_heads(m), "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "initializer_range": m.init_std, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
        "dtype": "float32",
    }


@torch.no_grad()
def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (contiguous, CPU) of a model that passed :func:`check_llama_exportable`."""
    state = model.state_dict()
    return {theirs: state[ours].detach().cpu().contiguous()
            for ours, theirs in llama_names(model.cfg.model).items()}


def write_llama(model: Transformer, cfg: Config, out: str | Path, tokenizer: Path | None) -> Path:
    """Save a dense hgf model as a transformers ``LlamaForCausalLM`` folder."""
    check_llama_exportable(cfg)
    tok, eos = hf_tokenizer(tokenizer) if tokenizer is not None else (None, None)
    state = llama_state_dict(model)
    with output_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(llama_config(cfg, eos), indent=2) + "\n",
                                         encoding="utf-8")
        (tmp / "generation_config.json").write_text(
            json.dumps({"eos_token_id": eos, "do_sample": False}, indent=2) + "\n",
            encoding="utf-8")
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if tok is not None:
            tok.save_pretrained(tmp)
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return Path(out)
