"""Triton kernels for packed ternary projections (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

Two launches per call, same math as hgf.kernels.reference:
1. ``_act_quant``: per token, ``s_x = 127 · (1 / max(max|x|, eps))`` and
   ``x_int = clamp(rint(x · s_x), -128, 127)`` into an int8 buffer padded with zeros to
   ``P · nbytes`` (P = codes per byte), so padded weights meet zero activations.
2. ``_gemv`` (few tokens: int32 multiply + row sums) or ``_gemm`` (prefill: int8 ``tl.dot``)
   reads the packed bytes directly. For byte ``p`` of a row (group ``g = p // 64``, ``j = p % 64``,
   group size ``G = min(64, nbytes - 64g)``) digit ``k`` is the weight at input index
   ``64·P·g + k·G + j`` (layout in hgf.kernels.packing); digit k = ``(byte // base^k) % base``
   (base 4 for i2, 3 for tq1), weight = digit - 1. The epilogue applies the scales in-kernel:
   ``y = float(acc) / (s_x · s_w)`` with IEEE division, cast to the output dtype.

Rounding is round-half-to-even like ``torch.round``: ``libdevice.rint`` on the GPU; the
interpreter (no libdevice) adds and subtracts 1.5·2^23 instead, exact for |v| < 2^22. The
interpreter also truncates float32 -> bfloat16 casts, so there the kernel writes float32 and
torch casts (round to nearest even, as the GPU cast does in-kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from hgf.kernels.packing import GROUP, get_packing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GEMV_MAX_TOKENS = 8  # up to this many tokens: GEMV kernel (one program per token and row block)


@triton.jit
def _act_quant(x_ptr, xq_ptr, sx_ptr, K, KP, eps, MAGIC_ROUND: tl.constexpr,
               BLOCK_K: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(1.0, tl.maximum(tl.max(amax, axis=0), eps)) * 127.0
    for k0 in range(0, KP, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + m * K + offs, mask=offs < K, other=0.0).to(tl.float32) * s
        if MAGIC_ROUND:  # noqa: SIM108 (constexpr branch: libdevice is absent when interpreted)
            r = (v + 12582912.0) - 12582912.0
        else:
            r = libdevice.rint(v)
        r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        tl.store(xq_ptr + m * KP + offs, r.to(tl.int8), mask=offs < KP)
    tl.store(sx_ptr + m, s)


@triton.jit
def _x_index(p, nbytes, k, P: tl.constexpr, GROUP_B: tl.constexpr):
    """Input index of digit k of row byte p (interleave groups of GROUP_B bytes)."""
    g = p // GROUP_B
    return g * (GROUP_B * P) + k * tl.minimum(nbytes - g * GROUP_B, GROUP_B) + p % GROUP_B


@triton.jit
def _gemv(xq_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, N, nbytes, KP, P: tl.constexpr,
          BASE: tl.constexpr, GROUP_B: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_B: tl.constexpr):
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    for b0 in range(0, nbytes, BLOCK_B):
        p = b0 + tl.arange(0, BLOCK_B)
        ok = p < nbytes
        q = tl.load(w_ptr + rows[:, None].to(tl.int64) * nbytes + p[None, :],
                    mask=(rows < N)[:, None] & ok[None, :], other=0).to(tl.int32)  # [BN, BB]
        for k in tl.static_range(P):
            x = tl.load(xq_ptr + m * KP + _x_index(p, nbytes, k, P, GROUP_B), mask=ok, other=0)
            acc += tl.sum((q % BASE - 1) * x.to(tl.int32)[None, :], axis=1)
            q = q // BASE
    scale = tl.load(sx_ptr + m) * tl.load(sw_ptr)
    y = tl.math.div_rn(acc.to(tl.float32), scale)
    tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _gemm(xq_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, M, N, nbytes, KP, P: tl.constexpr,
          BASE: tl.constexpr, GROUP_B: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for b0 in range(0, nbytes, BLOCK_B):
        p = b0 + tl.arange(0, BLOCK_B)
        ok = p < nbytes
        q = tl.load(w_ptr + rows[:, None].to(tl.int64) * nbytes + p[None, :],
                    mask=(rows < N)[:, None] & ok[None, :], other=0)  # [BN, BB] uint8
        for k in tl.static_range(P):
            xi = _x_index(p, nbytes, k, P, GROUP_B)
            x = tl.load(xq_ptr + toks[:, None].to(tl.int64) * KP + xi[None, :],
                        mask=(toks < M)[:, None] & ok[None, :], other=0)  # [BM, BB] int8
            wk = ((q % BASE).to(tl.int32) - 1).to(tl.int8)  # explicit: no int promotion
            acc = tl.dot(x, tl.trans(wk), acc, out_dtype=tl.int32)
            q = q // BASE
    sx = tl.load(sx_ptr + toks, mask=toks < M, other=1.0)
    y = tl.math.div_rn(acc.to(tl.float32), sx[:, None] * tl.load(sw_ptr))
    tl.store(y_ptr + toks[:, None].to(tl.int64) * N + rows[None, :],
             y.to(y_ptr.dtype.element_ty), mask=(toks < M)[:, None] & (rows < N)[None, :])


def ternary_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    packing: str,
    out_features: int,
    in_features: int,
    act_eps: float = 1e-5,
    block_n: int = 16,
    block_b: int = 256,
) -> torch.Tensor:
    """Launch the two kernels; ``x: [..., in]`` on the GPU (or CPU under TRITON_INTERPRET)."""
    pk = get_packing(packing)
    per, base = pk.codes_per_byte, pk.base
    nbytes = pk.row_bytes(in_features)
    x2 = x.reshape(-1, in_features).contiguous()  # [M, in]
    m, kp = x2.shape[0], per * nbytes
    xq = torch.empty(m, kp, dtype=torch.int8, device=x.device)
    sx = torch.empty(m, dtype=torch.float32, device=x.device)
    y_dtype = torch.float32 if INTERPRET else x.dtype
    y = torch.empty(m, out_features, dtype=y_dtype, device=x.device)  # [M, out]
    if m == 0:
        return y.view(*x.shape[:-1], out_features).to(x.dtype)
    sw = w_scale.to(device=x.device, dtype=torch.float32).reshape(1)
    _act_quant[(m,)](x2, xq, sx, in_features, kp, act_eps, MAGIC_ROUND=INTERPRET, BLOCK_K=1024)
    w = packed.contiguous()
    if m <= GEMV_MAX_TOKENS:
        grid = (triton.cdiv(out_features, block_n), m)
        _gemv[grid](xq, sx, w, sw, y, out_features, nbytes, kp, P=per, BASE=base,
                    GROUP_B=GROUP, BLOCK_N=block_n, BLOCK_B=block_b)
    else:
        grid = (triton.cdiv(m, 32), triton.cdiv(out_features, 64))
        _gemm[grid](xq, sx, w, sw, y, m, out_features, nbytes, kp, P=per, BASE=base,
                    GROUP_B=GROUP, BLOCK_M=32, BLOCK_N=64, BLOCK_B=64)
    return y.view(*x.shape[:-1], out_features).to(x.dtype)
