"""Packed ternary weights and the kernels that multiply by them (CPU C++, Triton, reference)."""

from hgf.kernels.ops import kernel_for, ternary_linear
from hgf.kernels.packing import (
    ACCOUNTED,
    PACKING_REGISTRY,
    PACKINGS,
    Packing,
    get_packing,
    pack_ternary,
    packed_shape,
    unpack_ternary,
)
from hgf.kernels.reference import ternary_linear_reference

__all__ = [
    "ACCOUNTED", "PACKINGS", "PACKING_REGISTRY", "Packing", "get_packing", "kernel_for",
    "pack_ternary", "packed_shape", "ternary_linear",
    "ternary_linear_reference", "unpack_ternary",
]
