"""Packed ternary weight formats: ``i2`` (2 bits/weight) and ``tq1`` (1.6 bits/weight), and
``sherry`` (1.25 bits/weight, 3:4 sparse ternary only; its layout is in hgf.kernels.sherry).

A ternary weight ``W_t ∈ {-1, 0, +1}`` of shape ``[out, in]`` is stored as the *code*
``c = W_t + 1 ∈ {0, 1, 2}``, packed row by row along the input dim into a ``uint8`` tensor of
shape ``[out, nbytes]``:

    i2    4 codes per byte, base 4 (2-bit fields):   nbytes = ceil(in / 4)
          byte = c_0 + 4·c_1 + 16·c_2 + 64·c_3   (c_k in bits 2k..2k+1; the value 3 is unused)
    tq1   5 codes per byte, base 3 (trits):          nbytes = ceil(in / 5)
          byte = c_0 + 3·c_1 + 9·c_2 + 27·c_3 + 81·c_4   (0..242; 243..255 unused)

So ``out · nbytes`` equals ``hgf.memory.packed_bytes(out, in, packing)``. A row is padded to
``P · nbytes`` weights (P = 4 or 5 codes per byte) with weight 0 (code 1).

Element order within a row (chosen so that one shift+mask, or one table lookup, of a SIMD
vector of bytes yields *contiguous* weights): the row's bytes are cut into groups of
``GROUP = 64`` bytes (the last group holds the remaining ``G = nbytes mod 64`` bytes if that is
not 0; otherwise every group has ``G = 64``). Group ``g`` starts at byte ``64·g`` and covers the
``P·G`` weights starting at input index ``64·P·g``; within it

    byte j  (0 ≤ j < G)  holds, as digit k (0 ≤ k < P), the weight at input index
            64·P·g + k·G + j.

E.g. i2 with in = 4096: 16 full groups of 64 bytes; byte 5 of group 0 holds weights 5, 69,
133, 197 in bits 0-1, 2-3, 4-5, 6-7. A 64-byte AVX-512 load shifted right by 2k and masked with
3 gives the codes of 64 contiguous weights, which multiply 64 contiguous int8 activations.
"""

from __future__ import annotations

import math

import torch

from hgf.kernels.sherry import pack_sherry, sherry_row_bytes, unpack_sherry

PACKINGS = ("i2", "tq1", "sherry")  # sherry: 3:4 sparse ternary, 5 bits / 4 weights (kernels/sherry.py)
GROUP = 64  # bytes per interleave group
BASE = {"i2": 4, "tq1": 3}  # digit base
PER_BYTE = {"i2": 4, "tq1": 5}  # codes per byte


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r} (known: {', '.join(PACKINGS)})")


def row_bytes(in_features: int, packing: str) -> int:
    """Bytes of one packed row: ``ceil(in / 4)`` (i2) or ``ceil(in / 5)`` (tq1)."""
    _check_packing(packing)
    if packing == "sherry":
        return sherry_row_bytes(in_features)
    return math.ceil(in_features / PER_BYTE[packing])


def packed_shape(out_features: int, in_features: int, packing: str) -> tuple[int, int]:
    """Shape ``(out, nbytes)`` of the packed uint8 tensor."""
    return (out_features, row_bytes(in_features, packing))


def _groups(nbytes: int) -> list[tuple[int, int]]:
    """(first byte, group size G) of each interleave group of a row of ``nbytes`` bytes."""
    return [(b, min(GROUP, nbytes - b)) for b in range(0, nbytes, GROUP)]


def pack_ternary(w_t: torch.Tensor, packing: str) -> torch.Tensor:
    """Pack ternary values ``[out, in]`` (any int or float dtype, values in {-1, 0, 1})."""
    _check_packing(packing)
    if w_t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [out, in] tensor, got {tuple(w_t.shape)}")
    if w_t.is_floating_point() and not torch.equal(w_t, w_t.round()):
        raise ValueError("pack_ternary: weights are not integers")
    if w_t.numel() and (w_t.min() < -1 or w_t.max() > 1):
        raise ValueError("pack_ternary: weights must be in {-1, 0, 1}")
    if packing == "sherry":
        return pack_sherry(w_t)
    out_f, in_f = w_t.shape
    base, per = BASE[packing], PER_BYTE[packing]
    nbytes = row_bytes(in_f, packing)
    codes = torch.ones(out_f, per * nbytes, dtype=torch.int32, device=w_t.device)  # pad = code 1
    codes[:, :in_f] = w_t.to(torch.int32) + 1
    powers = base ** torch.arange(per, dtype=torch.int32, device=w_t.device)  # [P]
    parts = []
    for b, g in _groups(nbytes):
        block = codes[:, per * b: per * (b + g)].view(out_f, per, g)  # [out, P, G]: digit k, byte j
        parts.append((block * powers[:, None]).sum(dim=1))  # [out, G]
    return torch.cat(parts, dim=1).to(torch.uint8) if parts else codes.new_empty(out_f, 0).byte()


def unpack_codes(packed: torch.Tensor, packing: str, in_features: int) -> torch.Tensor:
    """Codes ``W_t + 1`` (uint8, [out, in]) of a packed tensor."""
    _check_packing(packing)
    if packing == "sherry":
        return (unpack_sherry(packed, in_features) + 1).to(torch.uint8)
    base, per = BASE[packing], PER_BYTE[packing]
    out_f, nbytes = packed.shape
    if nbytes != row_bytes(in_features, packing):
        raise ValueError(f"packed tensor has {nbytes} bytes per row, {packing} with "
                         f"in_features={in_features} needs {row_bytes(in_features, packing)}")
    v = packed.to(torch.int32)
    powers = base ** torch.arange(per, dtype=torch.int32, device=packed.device)  # [P]
    parts = []
    for b, g in _groups(nbytes):
        digits = (v[:, None, b: b + g] // powers[:, None]) % base  # [out, P, G]
        parts.append(digits.reshape(out_f, per * g))  # weight k·G + j of the group
    codes = torch.cat(parts, dim=1) if parts else v.new_empty(out_f, 0)
    return codes[:, :in_features].to(torch.uint8)


def unpack_ternary(
    packed: torch.Tensor, packing: str, out_features: int, in_features: int
) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 values in {-1, 0, 1} of shape ``[out, in]``."""
    shape = packed_shape(out_features, in_features, packing)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != shape:
        raise ValueError(f"packed tensor must be uint8 of shape {shape}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    return unpack_codes(packed, packing, in_features).to(torch.int8) - 1
