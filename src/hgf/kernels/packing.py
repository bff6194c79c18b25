"""Packed ternary weight formats, and the one registry of packings (docs/STYLE.md §13).

A ternary weight ``W_t ∈ {-1, 0, +1}`` of shape ``[out, in]`` is stored as the *code*
``c = W_t + 1 ∈ {0, 1, 2}``, packed row by row along the input dim into a ``uint8`` tensor of
shape ``[out, nbytes]``, ``P`` codes per byte as the digits of a base-``b`` number:

    i2    P = 4, base 4 (2-bit fields), 2 bits/weight:   nbytes = ceil(in / 4)
          byte = c_0 + 4·c_1 + 16·c_2 + 64·c_3   (c_k in bits 2k..2k+1; the value 3 is unused)
    tq1   P = 5, base 3 (trits), 1.6 bits/weight:        nbytes = ceil(in / 5)
          byte = c_0 + 3·c_1 + 9·c_2 + 27·c_3 + 81·c_4   (0..242; 243..255 unused)
    sherry  3:4 sparse ternary only (one zero in every 4 weights; model.linear = sherry),
          4 weights in 5 bits, 1.25 bits/weight; not a digit code: its own layout, pack and
          unpack in hgf.kernels.sherry (a :class:`Codec`)

A row is padded to ``P · nbytes`` weights with weight 0 (code 1).

``PACKING_REGISTRY`` holds each format once: codes per byte, digit base, bits per weight, row
bytes, the largest byte value, the llama.cpp GGUF type that stores the same ternary values.
Memory accounting (hgf.memory), the exporters (hgf.infer.export, hgf.gguf), the kernels, the
native decoder, the planner, the benchmarks and the reports read it. It also holds ``entropy``,
the log2(3) bits/weight limit: a byte count for accounting, not a format one can store
(``storable`` False); ``PACKINGS`` lists the storable ones, ``ACCOUNTED`` all of them.

Adding a packing: add one :class:`Packing` entry to ``PACKING_REGISTRY``. A base-``b`` digit
format like i2 and tq1 then packs, unpacks, exports and runs through the reference kernel as it
is, and the CLI choices, memory tables and benchmarks list it. The C++ CPU kernel, the native
decoder and the Triton kernel each have a code path per format: ``kernels`` names the ones that
do; the others fall back to the reference (``hgf.kernels.ops``, ``hgf.infer.engine``). A format
that is not a base-``b`` digit code (sparse, two-plane) also needs its own pack/unpack: a
:class:`Codec` in its entry (``sherry``), and ``sparsity`` when it holds only some ternary
weights (the exporters refuse other models, the memory report lists it for such models only).

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hgf.kernels.sherry import pack_sherry, sherry_row_bytes, unpack_sherry

GROUP = 64  # bytes per interleave group


@dataclass(frozen=True)
class Codec:
    """The row layout of a packing that is not a base-``b`` digit code: bytes per row of ``in``
    weights, pack (``[out, in]`` ternary -> uint8 ``[out, row_bytes]``), unpack (uint8, ``in``
    -> int8 ternary ``[out, in]``); each raises ValueError on weights or sizes it cannot hold."""

    row_bytes: Callable[[int], int]
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Packing:
    """One ternary weight format: ``codes_per_byte`` codes ``W_t + 1`` per byte as base-``base``
    digits, or its own ``codec`` (all None for an accounting-only limit such as ``entropy``)."""

    name: str
    bits: float  # bits per weight, padding aside
    codes_per_byte: int | None = None
    base: int | None = None
    gguf_type: str | None = None  # the GGML type holding the same ternary values, if any
    kernels: tuple[str, ...] = ()  # fast paths that read it: "cpu", "triton", "decoder"
    doc: str = ""
    codec: Codec | None = None  # a format that is not a digit code: its own layout
    sparsity: str | None = None  # the ternary weights it holds: None = any, "3:4" = 3:4 sparse
    cpu_op: str = "ternary_linear_cpu"  # the torch.ops.hgf op of its "cpu" kernel

    @property
    def storable(self) -> bool:
        return self.codes_per_byte is not None or self.codec is not None

    @property
    def max_byte(self) -> int:
        """The largest byte value a packed tensor holds (codes 2, 2, ...: base^P - 1)."""
        return 255 if self.codec is not None else self.base ** self.codes_per_byte - 1

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one packed row of ``in_features`` weights: ``ceil(in / P)``."""
        if not self.storable:
            raise ValueError(f"packing {self.name!r} is an accounting limit, not a storable format")
        if self.codec is not None:
            return self.codec.row_bytes(in_features)
        return math.ceil(in_features / self.codes_per_byte)

    def tensor_bytes(self, out_features: int, in_features: int) -> float:
        """Bytes of one packed ``[out, in]`` weight, without its scale (``entropy``: the
        fractional limit ``out · in · log2(3) / 8``)."""
        if not self.storable:
            return out_features * in_features * self.bits / 8
        return out_features * self.row_bytes(in_features)


PACKING_REGISTRY: dict[str, Packing] = {p.name: p for p in (
    Packing("i2", 2.0, codes_per_byte=4, base=4, gguf_type="TQ2_0",
            kernels=("cpu", "triton", "decoder"), doc="2 bits/weight, 4 codes per byte in 2-bit fields"),
    Packing("tq1", 1.6, codes_per_byte=5, base=3, gguf_type="TQ1_0",
            kernels=("cpu", "triton", "decoder"), doc="1.6 bits/weight, 5 trits per byte"),
    Packing("sherry", 1.25, kernels=("cpu", "decoder"), sparsity="3:4",
            codec=Codec(sherry_row_bytes, pack_sherry, unpack_sherry), cpu_op="sherry_linear_cpu",
            doc="1.25 bits/weight, 3:4 sparse ternary: 4 weights in 5 bits (hgf.kernels.sherry)"),
    Packing("entropy", math.log2(3), doc="log2(3) bits/weight, the limit (accounting only)"),
)}
PACKINGS = tuple(n for n, p in PACKING_REGISTRY.items() if p.storable)  # what can be stored
ACCOUNTED = tuple(PACKING_REGISTRY)  # what hgf.memory reports


def get_packing(packing: str) -> Packing:
    """The storable packing named ``packing`` (ValueError naming the known ones otherwise)."""
    p = PACKING_REGISTRY.get(packing)
    if p is None or not p.storable:
        raise ValueError(f"unknown packing {packing!r} (known: {', '.join(PACKINGS)})")
    return p


def row_bytes(in_features: int, packing: str) -> int:
    """Bytes of one packed row: ``ceil(in / codes_per_byte)``."""
    return get_packing(packing).row_bytes(in_features)


def packed_shape(out_features: int, in_features: int, packing: str) -> tuple[int, int]:
    """Shape ``(out, nbytes)`` of the packed uint8 tensor."""
    return (out_features, row_bytes(in_features, packing))


def _groups(nbytes: int) -> list[tuple[int, int]]:
    """(first byte, group size G) of each interleave group of a row of ``nbytes`` bytes."""
    return [(b, min(GROUP, nbytes - b)) for b in range(0, nbytes, GROUP)]


def pack_ternary(w_t: torch.Tensor, packing: str) -> torch.Tensor:
    """Pack ternary values ``[out, in]`` (any int or float dtype, values in {-1, 0, 1})."""
    p = get_packing(packing)
    if w_t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [out, in] tensor, got {tuple(w_t.shape)}")
    if w_t.is_floating_point() and not torch.equal(w_t, w_t.round()):
        raise ValueError("pack_ternary: weights are not integers")
    if w_t.numel() and (w_t.min() < -1 or w_t.max() > 1):
        raise ValueError("pack_ternary: weights must be in {-1, 0, 1}")
    if p.codec is not None:
        return p.codec.pack(w_t)
    out_f, in_f = w_t.shape
    base, per = p.base, p.codes_per_byte
    nbytes = p.row_bytes(in_f)
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
    p = get_packing(packing)
    if p.codec is not None:
        return (p.codec.unpack(packed, in_features) + 1).to(torch.uint8)
    base, per = p.base, p.codes_per_byte
    out_f, nbytes = packed.shape
    if nbytes != p.row_bytes(in_features):
        raise ValueError(f"packed tensor has {nbytes} bytes per row, {packing} with "
                         f"in_features={in_features} needs {p.row_bytes(in_features)}")
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
