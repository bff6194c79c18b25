"""The ``sherry`` packing: 3:4 sparse ternary weights, 4 weights in 5 bits (1.25 bits/weight).

A group of 4 consecutive weights of a row (input indices 4g..4g+3) with exactly one zero has
4 · 2³ = 32 possible values, coded in 5 bits as a 4-bit index and a sign bit:

    z  = the position of the zero (0..3)                                   idx bits 0-1
    n0 < n1 < n2 = the positions of the three non-zeros
    s  = [w[n0] < 0]                                                       the sign bit
    idx bit 2 = [w[n1] ≠ w[n0]],  idx bit 3 = [w[n2] ≠ w[n0]]
    decode: u[z] = 0, u[n0] = +1, u[n1] = 1 − 2·bit2, u[n2] = 1 − 2·bit3;  w = (1 − 2s) · u

(the 16 sign-less patterns u are one AVX2 ``vpshufb`` table per position k; the sign bit flips
the group, as the paper's 4-bit index + 1 sign bit).

Row layout: the row's groups are cut into blocks of 32 groups (128 weights); the last block holds
the remaining ``G_b = (in mod 128) / 4`` groups when ``in`` is not a multiple of 128. A block of
``G_b`` groups takes ``h = ceil(G_b / 2)`` index bytes then ``ceil(G_b / 8)`` sign bytes:

    index byte j (0 ≤ j < h):   group j in bits 0-3, group j + h in bits 4-7 (0 when j + h ≥ G_b)
    sign byte j:                bit t of byte j is s of group 8j + t

so a full block is 16 + 4 = 20 bytes for 128 weights, exactly 1.25 bits/weight, and one 16-byte
load split into low and high nibbles gives the indices of groups 0..31 in order. Bytes per row:
``20 · (in // 128) + ceil(G_b/2) + ceil(G_b/8)``. ``in`` must be a multiple of 4, and every group
must have exactly one zero (a model trained with ``model.linear = sherry`` has; other ternary
models do not and are refused with a one-line error).

The kernel (``hgf::sherry_linear_cpu``, csrc/sherry_cpu.cpp) computes what
``hgf.kernels.reference.ternary_linear_reference`` computes on the unpacked weights, bit for bit.
"""

from __future__ import annotations

import math

import torch

BLOCK_GROUPS = 32  # groups (of 4 weights) per block
BLOCK_BYTES = 20  # bytes of a full block: 16 index + 4 sign


def _block_sizes(in_features: int) -> list[int]:
    """Groups per block of a row: full blocks of 32, then the tail."""
    groups = in_features // 4
    return [min(BLOCK_GROUPS, groups - g) for g in range(0, groups, BLOCK_GROUPS)]


def block_bytes(groups: int) -> int:
    return math.ceil(groups / 2) + math.ceil(groups / 8)


def sherry_row_bytes(in_features: int) -> int:
    """Bytes of one packed row (``in_features`` a multiple of 4)."""
    if in_features % 4:
        raise ValueError(f"sherry packing: in_features={in_features} is not a multiple of 4")
    return sum(block_bytes(g) for g in _block_sizes(in_features))


# the sign-less pattern u (4 weights) of each 4-bit index
def _patterns() -> torch.Tensor:
    pats = torch.zeros(16, 4, dtype=torch.int8)
    for idx in range(16):
        z = idx & 3
        nz = [k for k in range(4) if k != z]
        pats[idx, nz[0]] = 1
        pats[idx, nz[1]] = -1 if idx & 4 else 1
        pats[idx, nz[2]] = -1 if idx & 8 else 1
    return pats


PATTERNS = _patterns()  # [16, 4] int8


def encode_groups(w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, sign)`` per group of a ``[out, in]`` 3:4 ternary tensor: int32 ``[out, in/4]``."""
    out_f, in_f = w_t.shape
    g = w_t.to(torch.int32).view(out_f, in_f // 4, 4)  # [out, G, 4]
    zeros = g == 0
    if w_t.numel() and not bool((zeros.sum(-1) == 1).all()):
        raise ValueError("sherry packing needs exactly one zero in every group of 4 weights "
                         "(a model trained with model.linear=sherry); use i2 or tq1 for others")
    z = zeros.to(torch.int32).argmax(-1)  # [out, G]
    order = torch.arange(4, device=w_t.device).expand_as(g)
    # the non-zeros in order: positions k != z
    nz = order[~zeros].view(out_f, in_f // 4, 3)  # [out, G, 3]
    vals = torch.gather(g, -1, nz)  # [out, G, 3] in {-1, 1}
    sign = (vals[..., 0] < 0).to(torch.int32)
    idx = z | ((vals[..., 1] != vals[..., 0]).to(torch.int32) << 2) \
        | ((vals[..., 2] != vals[..., 0]).to(torch.int32) << 3)
    return idx, sign


def pack_sherry(w_t: torch.Tensor) -> torch.Tensor:
    """Pack 3:4 sparse ternary values ``[out, in]`` (values in {-1, 0, 1}) to uint8."""
    if w_t.dim() != 2:
        raise ValueError(f"pack_sherry expects a 2-D [out, in] tensor, got {tuple(w_t.shape)}")
    out_f, in_f = w_t.shape
    sherry_row_bytes(in_f)  # checks in % 4
    idx, sign = encode_groups(w_t)
    parts, g0 = [], 0
    for gb in _block_sizes(in_f):
        h = math.ceil(gb / 2)
        bi, bs = idx[:, g0:g0 + gb], sign[:, g0:g0 + gb]  # [out, gb]
        lo = bi[:, :h]
        hi = torch.zeros_like(lo)
        hi[:, :gb - h] = bi[:, h:]
        parts.append(lo | (hi << 4))  # [out, h]
        ns = math.ceil(gb / 8)
        padded = torch.zeros(out_f, 8 * ns, dtype=torch.int32, device=w_t.device)
        padded[:, :gb] = bs
        bits = 1 << torch.arange(8, dtype=torch.int32, device=w_t.device)
        parts.append((padded.view(out_f, ns, 8) * bits).sum(-1))  # [out, ns]
        g0 += gb
    if not parts:
        return torch.zeros(out_f, 0, dtype=torch.uint8, device=w_t.device)
    return torch.cat(parts, dim=1).to(torch.uint8)


def unpack_sherry(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_sherry`: int8 ``[out, in]`` in {-1, 0, 1}."""
    out_f, nbytes = packed.shape
    if nbytes != sherry_row_bytes(in_features):
        raise ValueError(f"packed tensor has {nbytes} bytes per row, sherry with "
                         f"in_features={in_features} needs {sherry_row_bytes(in_features)}")
    v = packed.to(torch.int64)
    idxs, signs, b0 = [], [], 0
    for gb in _block_sizes(in_features):
        h, ns = math.ceil(gb / 2), math.ceil(gb / 8)
        ib = v[:, b0:b0 + h]
        idxs.append(torch.cat([ib & 15, ib >> 4], dim=1)[:, :gb])  # [out, gb]
        sb = v[:, b0 + h:b0 + h + ns]  # [out, ns]
        bits = (sb[:, :, None] >> torch.arange(8, device=packed.device)) & 1  # [out, ns, 8]
        signs.append(bits.reshape(out_f, 8 * ns)[:, :gb])
        b0 += h + ns
    if not idxs:
        return torch.zeros(out_f, 0, dtype=torch.int8, device=packed.device)
    idx, sign = torch.cat(idxs, dim=1), torch.cat(signs, dim=1)  # [out, G]
    u = PATTERNS.to(packed.device)[idx]  # [out, G, 4]
    w = u * (1 - 2 * sign.to(torch.int8))[..., None]
    return w.reshape(out_f, in_features).to(torch.int8)
