"""The native decoder: a packed model's whole forward pass as one C++ call per token.

The eager packed model (``load_packed``: the hgf ``Transformer`` with ``PackedTernaryLinear``
projections) runs ~2,500 PyTorch ops per decoded token; their dispatch, not the 20 MiB of packed
weights, set its speed. ``torch.classes.hgf.Decoder`` (``hgf/kernels/csrc/decode_cpu.cpp``) holds
pointers to the packed model's tensors and its own KV cache and runs one token (or a whole
prompt, as batched GEMMs) in one call, with the fusions that pay: q/k/v and gate/up as one kernel
job each on an input normalised and quantized once, the rank-r correction's ``A x`` in the same
input stage and ``B' h`` in the GEMV's epilogue, RoPE tables and λ computed once, single-query
attention straight over the cache (differential attention's two maps in one pass over V), and the
head in the file's own dtype (fp16, or int8 rows with ``--embeddings int8``). Tequila's folded
dead-zone bias is added in the GEMV's epilogue (7 extra slots per layer); the sherry packing runs
its own GEMV (csrc/sherry_cpu.cpp) on activation planes permuted once per token, and prompts
take it per token (no unpacked-rows path).

The PyTorch ``Transformer`` stays the one definition of the model: tests/test_engine.py checks that
this path produces the same greedy tokens as the reference for every arm and packing. Where the
native decoder cannot run (not the CPU, a dense or non-float32 model, the kernel library not
built, ``HGF_NO_NATIVE_DECODER=1``), generation falls back to the reference path and says why in
one line on stderr.

    model, header = hgf.infer.engine.load_for_decode("model.hgf")   # native, or the Transformer
    hgf.infer.generate(model, tokenizer, "Once upon a time")
    hgf.infer.generate(load_packed("model.hgf")[0], tokenizer, "...")  # native too (from_model)

Two ways to build one: :meth:`NativeModel.from_file` reads the file's tensors in their stored dtypes
(fp16 embeddings, head, A and B'; no float32 copy of anything, so the process holds about the
file's bytes), :meth:`NativeModel.from_model` points into a loaded packed ``Transformer``'s tensors
(float32 head and correction, shared with the reference path).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from hgf.config import Config, kv_heads, subln_enabled
from hgf.errors import HGFError
from hgf.infer.format import PackedHeader, read_header
from hgf.kernels.packing import PACKING_REGISTRY
from hgf.model.attention import DifferentialAttention, lambda_init_for, rope_cache
from hgf.model.transformer import Transformer

# Decoder.set_options switches, each undoing one fusion (for measuring what it buys)
OPT_SPLIT_PROJ = 1  # q, k, v and gate, up: one kernel job (and one quantization) each
OPT_SPLIT_CORR = 2  # the correction's B' h as a second pass instead of the GEMV epilogue
OPT_TWO_PASS_DIFF = 4  # differential attention: o1 and o2 in two passes over V
OPT_NO_UNPACK = 8  # prompts on AVX2: the packed kernel per token instead of unpacked row blocks
OPT_NO_PREFETCH = 16  # decode: no software prefetch 4 KiB ahead in each projection's bytes
KV_CACHE_TYPES = ("f32", "f16")  # NativeModel.kv_cache
OPT_HEAD_ROWS4 = 32  # the head and the correction's A x four rows at once instead of row by row

ATTN_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",))
MLP_GROUPS = (("gate_proj", "up_proj"), ("down_proj",))
BIAS_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DISABLE_ENV = "HGF_NO_NATIVE_DECODER"
EMPTY = torch.empty(0)


def notice(reason: str) -> None:
    """The one-line fallback notice."""
    print(f"hgf: note: native decoder not used ({reason}); decoding with the PyTorch reference "
          "path", file=sys.stderr)


def config_reason(cfg: Config) -> str | None:
    """Why a model of this config cannot run natively, or None."""
    m = cfg.model
    if m.linear == "ptqtp" and cfg.ptqtp.activations != "int8":
        return "model.linear=ptqtp with ptqtp.activations=fp (weight-only): no packed form"
    if m.linear not in ("bitlinear", "hgf", "tequila", "sherry", "ptqtp"):
        return f"model.linear={m.linear}: dense projections"
    if cfg.quant.act_bits != 8:
        return f"quant.act_bits={cfg.quant.act_bits}"
    if m.attention not in ("standard", "differential") or m.mlp not in ("swiglu", "relu2"):
        return f"attention={m.attention}, mlp={m.mlp}"
    return None


def unsupported_reason(cfg: Config, device: torch.device | str,
                       dtype: torch.dtype = torch.float32) -> str | None:
    """Why the native decoder cannot run this model here, or None."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    if torch.device(device).type != "cpu":
        return f"device {torch.device(device)} is not the CPU"
    if dtype != torch.float32:
        return f"the model's full-precision parts are {dtype}, the native decoder runs float32"
    reason = config_reason(cfg)
    if reason is not None:
        return reason
    from hgf.kernels import cpu

    if not cpu.load():
        return "the C++ kernel library is not built"
    return None


# ---------------------------------------------------------------------------------------------
# The decoder


class NativeModel:
    """A packed model's forward pass in ``torch.classes.hgf.Decoder``, with its own KV cache.

    ``forward(ids, start)`` runs tokens ``ids`` at positions start.. (all at once: a prompt is
    batched) and returns the logits ``[1 or len(ids), vocab]``; ``setup_caches(max_len)`` first.
    ``model(idx, start)`` mimics the Transformer's call for tests (``[1, t, vocab]``)."""

    def __init__(self, cfg: Config, packing: str, slots: list[torch.Tensor], ints: list[int],
                 floats: list[float], source: str) -> None:
        self.cfg, self.packing, self.source = cfg, packing, source
        self.tensors = slots  # the decoder points into these: keep them alive
        self.decoder = torch.classes.hgf.Decoder(slots, ints, floats)
        self.device = torch.device("cpu")
        self.max_len = 0

    # -- building

    @classmethod
    def _build(cls, cfg: Config, packing: str, get: Callable[[str], torch.Tensor | None],
               proj: Callable[[str], tuple[torch.Tensor, float, torch.Tensor | None,
                                           torch.Tensor | None]],
               lam: Callable[[int], float], act_eps: float, source: str) -> NativeModel:
        """Lay the tensors out as Decoder's slots (see decode_cpu.cpp). ``get(name)`` is a float
        tensor of the model's state dict (None if absent); ``proj(N)`` is projection N's (packed
        bytes, s_w, A [r, in] or None, B'ᵀ [r, out] or None); ``lam(i)`` layer i's λ."""
        m = cfg.model
        diff = m.attention == "differential"
        slots: list[torch.Tensor] = [get("tok_emb.weight"), _or_empty(get("tok_emb.row_scale")),
                                     get("norm.weight"), get("lm_head.weight"),
                                     _or_empty(get("lm_head.row_scale"))]
        cos, sin = rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
        slots += [cos.contiguous(), sin.contiguous()]
        floats: list[float] = [m.norm_eps, act_eps]
        subln = subln_enabled(m)

        def group(prefix: str, names: tuple[str, ...]) -> list[torch.Tensor]:
            parts = [proj(f"{prefix}.{n}") for n in names]
            a_rows = [a for _, _, a, _ in parts if a is not None]
            out = [torch.cat(a_rows).contiguous() if a_rows else EMPTY]
            for w, s_w, _, b_t in parts:
                out += [w, _or_empty(b_t)]
                floats.append(s_w)
            return out

        for i in range(m.n_layers):
            p = f"layers.{i}"
            slots.append(get(f"{p}.attn_norm.weight"))
            slots += group(f"{p}.attn", ATTN_GROUPS[0])
            slots.append(_or_empty(get(f"{p}.attn.subln.weight") if subln else None))
            slots.append(_or_empty(get(f"{p}.attn.head_norm.weight") if diff else None))
            slots += group(f"{p}.attn", ATTN_GROUPS[1])
            slots.append(get(f"{p}.mlp_norm.weight"))
            slots += group(f"{p}.mlp", MLP_GROUPS[0])
            slots.append(_or_empty(get(f"{p}.mlp.subln.weight") if subln else None))
            slots += group(f"{p}.mlp", MLP_GROUPS[1])
            # per layer: 7 s_w (appended by group), then λ and the head-norm factor 1 - λ_init
            floats += [lam(i), 1.0 - lambda_init_for(i)] if diff else [0.0, 1.0]
        pk = PACKING_REGISTRY[packing]  # the C++ decoder's packing switch: codes per byte, 0 for
        per_byte = 0 if pk.codec is not None else pk.codes_per_byte  # sherry (its own layout)
        ints = [m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, int(diff),
                int(m.mlp == "relu2"), per_byte, m.max_seq_len, kv_heads(m)]
        biases = [get(f"layers.{i}.{'attn' if n in ATTN_GROUPS[0] + ATTN_GROUPS[1] else 'mlp'}"
                      f".{n}.bias") for i in range(m.n_layers) for n in BIAS_ORDER]
        if any(b is not None for b in biases):  # Tequila: 7 bias slots per layer after the layers
            slots += [_or_empty(None if b is None else b.float().contiguous()) for b in biases]
            ints.append(1)
        alphas = [get(f"layers.{i}.{'attn' if n in ATTN_GROUPS[0] + ATTN_GROUPS[1] else 'mlp'}"
                      f".{n}.plane_scale") for i in range(m.n_layers) for n in BIAS_ORDER]
        if any(a is not None for a in alphas):  # PTQTP: 7 row-scale slots per layer after those
            slots += [_or_empty(None if a is None else a.float().contiguous()) for a in alphas]
            ints += [0, 1] if len(ints) == 10 else [1]
        return cls(cfg, packing, slots, ints, floats, source)

    @classmethod
    def from_model(cls, model: Transformer) -> NativeModel:
        """Point into a packed Transformer's tensors (``load_packed``); raise HGFError if it
        cannot run natively (see :func:`model_reason`)."""
        reason = model_reason(model)
        if reason is not None:
            raise HGFError(f"native decoder: {reason}")
        from hgf.infer.packed import PackedTernaryLinear
        from hgf.infer.ptqtp import PackedPTQTPLinear

        state = (dict(model.named_parameters(remove_duplicate=False))
                 | dict(model.named_buffers(remove_duplicate=False)))
        mods = dict(model.named_modules())
        kinds = (PackedTernaryLinear, PackedPTQTPLinear)
        packing = next(m.packing for m in mods.values() if isinstance(m, kinds))
        act_eps = {m.act_eps for m in mods.values() if isinstance(m, kinds)}

        def get(name: str) -> torch.Tensor | None:
            t = state.get(name)
            return None if t is None else t.detach().contiguous()

        def proj(name: str):
            p = mods[name]
            if isinstance(p, PackedPTQTPLinear):  # both planes, s_w = 1 (row scales: alphas)
                return p.planes_packed.contiguous(), 1.0, None, None
            if p.A_t is None:
                return p.weight_packed.contiguous(), float(p.weight_scale), None, None
            return (p.weight_packed.contiguous(), float(p.weight_scale), p.A_t.t(),
                    p.B_t.contiguous())

        def lam(i: int) -> float:
            with torch.no_grad():
                return float(model.layers[i].attn.lambda_full())

        return cls._build(model.cfg, packing, get, proj, lam, act_eps.pop(), "model")

    @classmethod
    def from_file(cls, path: str | Path | PackedHeader) -> NativeModel:
        """Read a packed file's tensors in their stored dtypes (fp16 or int8 embeddings and head,
        fp16 A and B'); no Transformer is built."""
        header = path if isinstance(path, PackedHeader) else read_header(path)
        cfg = header.config
        reason = unsupported_reason(cfg, "cpu")
        if reason is not None:
            raise HGFError(f"{header.path}: native decoder: {reason}")
        try:
            tensors = load_file(str(header.path), device="cpu")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise HGFError(f"{header.path}: cannot read tensors: "
                           f"{str(e).splitlines()[0]}") from None
        if cfg.model.tie_embeddings:
            tensors["lm_head.weight"] = tensors["tok_emb.weight"]
            if "tok_emb.row_scale" in tensors:
                tensors["lm_head.row_scale"] = tensors["tok_emb.row_scale"]

        def get(name: str) -> torch.Tensor | None:
            t = tensors.get(name)
            return None if t is None else t.contiguous()

        def proj(name: str):
            if f"{name}.planes_packed" in tensors:  # PTQTP: both planes, s_w = 1
                return tensors[f"{name}.planes_packed"], 1.0, None, None
            w, s_w = tensors[f"{name}.weight_packed"], float(tensors[f"{name}.weight_scale"])
            if f"{name}.A" not in tensors:
                return w, s_w, None, None
            return w, s_w, tensors[f"{name}.A"], tensors[f"{name}.B"].t().contiguous()

        def lam(i: int) -> float:
            p = f"layers.{i}.attn"
            ns = types.SimpleNamespace(lambda_init=lambda_init_for(i), **{
                k: tensors[f"{p}.{k}"] for k in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")})
            return float(DifferentialAttention.lambda_full(ns))  # the reference's own formula

        return cls._build(cfg, header.packing, get, proj, lam, cfg.quant.act_eps, "file")

    # -- running

    def setup_caches(self, max_len: int) -> None:
        self.decoder.setup(max_len)
        self.max_len = max_len

    def clear_caches(self) -> None:
        """End the sequence; the cache's memory stays for the next one (release_caches frees)."""
        self.decoder.clear()
        self.max_len = 0

    def release_caches(self) -> None:
        self.decoder.release()
        self.max_len = 0

    def forward(self, ids: list[int], start: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Logits ``[1, vocab]`` of the last token (``[len(ids), vocab]`` with all_logits)."""
        return self.decoder.run(ids, start, all_logits)

    def __call__(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``idx [1, t]`` -> logits ``[1, t, vocab]``, like ``Transformer.__call__``: over the
        set-up cache, else over a temporary one (then start must be 0)."""
        if idx.dim() != 2 or idx.shape[0] != 1:
            raise ValueError(f"the native decoder runs batch 1, got ids of shape {tuple(idx.shape)}")
        ids = idx[0].tolist()
        if self.max_len:
            return self.forward(ids, start, all_logits=True)[None]
        if start != 0:
            raise ValueError("start > 0 needs setup_caches() first")
        self.setup_caches(len(ids))
        try:
            return self.forward(ids, 0, all_logits=True)[None]
        finally:
            self.clear_caches()

    def set_options(self, options: int) -> None:
        """OPT_* switches (0 = every fusion on)."""
        self.decoder.set_options(options)

    @property
    def kv_cache(self) -> str:
        """The KV cache's element type: ``"f32"`` (default: the reference path's numbers) or
        ``"f16"`` (half the bytes, llama.cpp's default; logits within fp16 rounding)."""
        return "f16" if self.decoder.kv_is_half() else "f32"

    @kv_cache.setter
    def kv_cache(self, dtype: str) -> None:
        if dtype not in KV_CACHE_TYPES:
            raise HGFError(f"KV cache type {dtype!r}: choose one of {', '.join(KV_CACHE_TYPES)}")
        if dtype != self.kv_cache:
            self.decoder.set_kv_half(dtype == "f16")  # frees the cache: set up again
            self.max_len = 0

    def weight_bytes(self) -> int:
        """Bytes of the tensors the decoder reads (tied embeddings once)."""
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in self.tensors}.values())

    def cache_bytes(self) -> int:
        return int(self.decoder.cache_bytes())


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return EMPTY if t is None else t


def model_reason(model: nn.Module) -> str | None:
    """Why a (packed) Transformer cannot run natively, or None."""
    from hgf.infer.packed import PackedTernaryLinear
    from hgf.infer.ptqtp import PackedPTQTPLinear

    if not isinstance(model, Transformer):
        return f"{type(model).__name__} is not an hgf Transformer"
    w = model.tok_emb.weight
    reason = unsupported_reason(model.cfg, w.device, w.dtype)
    if reason is not None:
        return reason
    packings = set()
    for block in model.layers:
        for name, mod in [*block.attn.named_children(), *block.mlp.named_children()]:
            if name.endswith("_proj"):
                if not isinstance(mod, (PackedTernaryLinear, PackedPTQTPLinear)):
                    return f"projection {name} is {type(mod).__name__}, not packed"
                packings.add(mod.packing)
    if len(packings) != 1:
        return f"mixed packings {sorted(packings)}"
    if "decoder" not in PACKING_REGISTRY[packings.pop()].kernels:
        return "the packing has no native decoder path"
    return None


def is_packed(model: nn.Module) -> bool:
    from hgf.infer.packed import PackedTernaryLinear
    from hgf.infer.ptqtp import PackedPTQTPLinear

    return any(isinstance(m, (PackedTernaryLinear, PackedPTQTPLinear)) for m in model.modules())


def native_for(model: nn.Module) -> NativeModel | None:
    """The native decoder of a packed Transformer; None for a training model, and None with a
    one-line notice (once per model) for a packed model that cannot run natively."""
    if isinstance(model, NativeModel):
        return model
    if not is_packed(model):
        return None
    reason = model_reason(model)
    if reason is None:
        return NativeModel.from_model(model)
    if getattr(model, "_hgf_native_notice", None) != reason:
        notice(reason)
        model._hgf_native_notice = reason
    return None


@contextlib.contextmanager
def decode_runner(model: nn.Module | NativeModel, max_len: int, native: bool | None = None
                  ) -> Iterator[Callable[[list[int], int], torch.Tensor]]:
    """``forward(ids, start) -> logits [vocab]`` of the last of ``ids`` (positions start..),
    over a KV cache of ``max_len`` positions. ``native``: None = the native decoder where it can
    run (a packed model), True = required, False = the PyTorch Transformer."""
    if isinstance(model, NativeModel) and native is False:
        raise HGFError("this model is the native decoder; the reference path needs the "
                       "Transformer (hgf.infer.load_packed)")
    runner = None if native is False else native_for(model)
    if runner is None and native:
        raise HGFError("the native decoder cannot run this model: "
                       f"{model_reason(model) if is_packed(model) else 'not a packed model'}")
    if runner is not None:
        # The loop makes no reference cycles; the cyclic GC's periodic passes over every Python
        # object (torch has many) cost ~0.2 ms per token at the native decoder's speed.
        gc_was_on = gc.isenabled()
        gc.disable()
        runner.setup_caches(max_len)
        try:
            yield lambda ids, start: runner.forward(ids, start)[-1]
        finally:
            runner.clear_caches()
            if gc_was_on:
                gc.enable()
        return
    device = model.tok_emb.weight.device
    model.setup_caches(1, max_len)
    try:
        yield lambda ids, start: model(torch.tensor([ids], device=device), start=start)[0, -1]
    finally:
        model.clear_caches()


def load_for_decode(path: str | Path, device: torch.device | str = "cpu",
                    native: bool | None = None, kv_cache: str = "f32"
                    ) -> tuple[NativeModel | Transformer, PackedHeader]:
    """A packed file as the native decoder (``from_file``) where it can run, else (with the
    one-line notice) as the packed Transformer of ``load_packed``. ``kv_cache`` (``f32`` or
    ``f16``) is the native decoder's KV cache type; the reference path's cache is float32 (an
    ``f16`` request there says so in one line)."""
    from hgf.infer.packed import default_dtype, load_packed

    if kv_cache not in KV_CACHE_TYPES:
        raise HGFError(f"KV cache type {kv_cache!r}: choose one of {', '.join(KV_CACHE_TYPES)}")
    header = read_header(path)
    if native is not False:
        reason = unsupported_reason(header.config, device, default_dtype(device))
        if reason is None:
            model = NativeModel.from_file(header)
            model.kv_cache = kv_cache
            return model, header
        if native:
            raise HGFError(f"{header.path}: the native decoder cannot run it: {reason}")
        notice(reason)
        model, header = load_packed(path, device)
        model._hgf_native_notice = reason  # said once: generate does not repeat it
    else:
        model, header = load_packed(path, device)
    if kv_cache != "f32":
        print(f"hgf: KV cache {kv_cache} is a native-decoder option; the reference path keeps "
              "its cache in the model's dtype", file=sys.stderr)
    return model, header
