"""Helpers of the GGUF / llama.cpp tests: tiny trained models whose widths fit llama.cpp's TQ
blocks (256 values), and hgf computing with llama.cpp's activation quantizer (q8_K).

llama.cpp's TQ1_0/TQ2_0 matmul (ggml-cpu, x86 and generic: quantize_row_q8_K_ref) quantizes the
activation row per block of 256 values: ``max`` = the value of largest magnitude (the first one on
ties), ``iscale = -127/max``, ``q = min(127, nearest_int(iscale·x))`` (round half to even),
``d = 1/iscale``; then ``y = Σ_blocks d_w·d·Σ q_w q`` with d_w = 1 (hgf writes W_t itself) and
the per-tensor ``.scale``. hgf quantizes per token over the whole row (``act_quant``).
:func:`llama_cpp_activations` swaps hgf's quantizer for the q8_K one, so an hgf model computes
what llama.cpp computes up to float32 summation order.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

import hgf.model.quant as quant
from hgf.config import load_config
from hgf.model import build_model, lm_loss
from infer_utils import ROOT, corpus_ids, make_tokenizer

QK_K = 256
# d and d_ff multiples of 256 (TQ blocks); tied embeddings (llama.cpp's bitnet head is token_embd)
GGUF_DIMS = ("--model.d_model=256", "--model.d_ff=512", "--model.n_heads=4",
             "--model.tie_embeddings=true")


def q8k_act_quant(x: torch.Tensor, eps: float = 1e-5, bits: int = 8
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant``'s interface (codes, divisor), with q8_K's blocks: x_q = q / iscale."""
    x = x.detach().float()
    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // QK_K, QK_K)  # [..., blocks, 256]
    idx = xb.abs().argmax(dim=-1, keepdim=True)
    mx = xb.gather(-1, idx)  # signed value of largest magnitude  [..., blocks, 1]
    nz = mx != 0
    iscale = torch.where(nz, -127.0 / torch.where(nz, mx, 1.0), 1.0)
    q = torch.where(nz, (xb * iscale).round().clamp(max=127), 0.0)
    return q.reshape(shape), iscale.expand_as(xb).reshape(shape)


@contextlib.contextmanager
def llama_cpp_activations() -> Iterator[None]:
    """Inside the block, hgf's ternary layers quantize activations as llama.cpp's q8_K."""
    saved = quant.act_quant
    quant.act_quant = q8k_act_quant
    try:
        yield
    finally:
        quant.act_quant = saved


@functools.cache
def gguf_model(arm: str, steps: int = 100, tied: bool = True, seed: int = 0):
    """(model, cfg, loss) of a tiny ``arm`` model that llama.cpp can run, trained to memorise
    infer_utils' corpus (one-cycle LR, 64-token windows: greedy margins of several logits, far
    above the two runtimes' differences). Cached: do not modify the model."""
    torch.manual_seed(seed)
    dims = GGUF_DIMS if tied else tuple(d for d in GGUF_DIMS if "tie_embeddings" not in d)
    cfg = load_config(ROOT / "configs" / f"{arm}.toml", ["--model.vocab_size=320", *dims])
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    stream = corpus_ids(make_tokenizer()).repeat(8)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 65, (8,), generator=g)
        x = torch.stack([stream[s:s + 65] for s in starts.tolist()])  # [8, 65]
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False), cfg, loss.item()
