"""llama.cpp through llama-cpp-python's low-level C API (``llama_cpp.llama_*``), not its
high-level ``Llama`` class: load a GGUF model (and a LoRA adapter), tokenize, logits of every
position of a sequence, and a greedy decode loop that is one ``llama_decode`` and one C-level
greedy sampler call per token (timed by hgf.gguf.peer).

    with LlamaCpp("model.gguf", lora="model.lora.gguf", threads=1) as lm:
        ids = lm.tokenize("Once upon a time")
        logits = lm.logits(ids)               # [len(ids), n_vocab] float32
        out = lm.greedy(ids, 32)              # 32 greedy token ids
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from hgf.errors import HGFError

GGML_TYPE_F32 = 0
FLASH_ATTN_DISABLED = 0  # llama_flash_attn_type: -1 auto (the default), 0 disabled, 1 enabled
PIP_LINE = "pip install llama-cpp-python==0.3.36"
_STATE: dict[str, object] = {}


def require_llama_cpp():
    """The ``llama_cpp`` module (backend initialised, its log silenced) or a one-line HGFError."""
    try:
        import llama_cpp
    except ImportError:
        raise HGFError(f"running GGUF files in llama.cpp needs llama-cpp-python: {PIP_LINE}") from None
    if "init" not in _STATE:
        llama_cpp.llama_backend_init()

        @llama_cpp.llama_log_callback
        def _quiet(level, text, user_data):  # llama.cpp logs every load to stderr
            return None

        _STATE["log"] = _quiet  # keep the callback alive
        llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
        _STATE["init"] = True
    return llama_cpp


class LlamaCpp:
    """One llama.cpp model + context (+ LoRA adapter) on the CPU; ``f32_attention`` turns off
    llama.cpp's f16 KV cache and flash attention (for exact comparisons)."""

    def __init__(self, model: str | Path, lora: str | Path | None = None, n_ctx: int = 512,
                 threads: int = 1, f32_attention: bool = False, lora_scale: float = 1.0) -> None:
        lc = self.lc = require_llama_cpp()
        self.model = self.ctx = self.adapter = self.sampler = None
        self.batch = None
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(model).encode(), mp)
        if not self.model:
            raise HGFError(f"{model}: llama.cpp cannot load this file")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if f32_attention:  # attention in float32 as hgf runs it on the CPU. llama.cpp's default
            # is an f16 KV cache and (auto) flash attention, whose CPU kernel rounds to f16 too
            cp.type_k = cp.type_v = GGML_TYPE_F32
            cp.flash_attn_type = FLASH_ATTN_DISABLED
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise HGFError(f"{model}: llama.cpp cannot create a context")
        if lora is not None:
            self.adapter = lc.llama_adapter_lora_init(self.model, str(lora).encode())
            if not self.adapter:
                self.close()
                raise HGFError(f"{lora}: llama.cpp cannot load this LoRA adapter for {model}")
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(lora_scale)
            if lc.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                self.close()
                raise HGFError(f"{lora}: llama.cpp cannot apply this LoRA adapter")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.batch = lc.llama_batch_init(n_ctx, 0, 1)
        self.sampler = lc.llama_sampler_init_greedy()
        self._one = (lc.llama_token * 1)()

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        """llama.cpp's token ids of ``text`` (no BOS: hgf files set add_bos_token = false)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, parse_special)
        if n < 0:
            raise HGFError(f"llama.cpp tokenize needs {-n} slots, more than {n_max}")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
        return buf.raw[:n]

    def detokenize(self, ids: list[int]) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    # -- running ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache (a new sequence starts at position 0)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        b = self.batch
        b.n_tokens = len(ids)
        for j, t in enumerate(ids):
            b.token[j] = t
            b.pos[j] = start + j
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = 0
            b.logits[j] = all_logits or j == len(ids) - 1
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise HGFError("llama_decode failed")

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits ``[len(ids), n_vocab]`` of every position of ``ids`` (one prefill)."""
        if not 0 < len(ids) <= self.n_ctx:
            raise HGFError(f"a sequence of {len(ids)} tokens does not fit n_ctx={self.n_ctx}")
        self.reset()
        self._decode(ids, 0, True)
        ptr = self.lc.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.n_vocab)).copy()

    def greedy(self, prompt: list[int], n: int, timing: dict | None = None) -> list[int]:
        """``n`` greedy tokens after ``prompt``: one prefill, then per token one ``llama_decode``
        and one C greedy sampler call. ``timing`` (if given) receives wall/CPU clocks: prefill
        seconds, and the decode phase (tokens 2..n) in wall and process-CPU seconds."""
        lc, ctx = self.lc, self.ctx
        if len(prompt) + n > self.n_ctx:
            raise HGFError(f"{len(prompt)} + {n} tokens do not fit n_ctx={self.n_ctx}")
        self.reset()
        t0 = time.perf_counter()
        self._decode(prompt, 0, False)
        tok = lc.llama_sampler_sample(self.sampler, ctx, -1)
        t1, c1 = time.perf_counter(), time.process_time()
        out = [tok]
        one = self._one
        single = lc.llama_batch_get_one(one, 1)  # positions follow the KV cache
        for _ in range(n - 1):
            one[0] = tok
            if lc.llama_decode(ctx, single) != 0:
                raise HGFError("llama_decode failed")
            tok = lc.llama_sampler_sample(self.sampler, ctx, -1)
            out.append(tok)
        t2, c2 = time.perf_counter(), time.process_time()
        if timing is not None:
            timing.update(prefill_s=t1 - t0, decode_wall_s=t2 - t1, decode_cpu_s=c2 - c1,
                          decode_tokens=n - 1)
        return out

    # -- cleanup ---------------------------------------------------------------------------

    def close(self) -> None:
        lc = self.lc
        if self.sampler:
            lc.llama_sampler_free(self.sampler)
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
        if self.ctx:
            lc.llama_free(self.ctx)
        if self.adapter:
            lc.llama_adapter_lora_free(self.adapter)
        if self.model:
            lc.llama_model_free(self.model)
        self.model = self.ctx = self.adapter = self.sampler = self.batch = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
