"""PTQTP projections in the packed file and the packed runtime (hgf.model.ptqtp has the math).

File tensors of a PTQTP projection N (beside the BitLinear ones in hgf.infer.format):
    N.planes_packed   uint8  packed_shape(2·out, in, packing)   rows 0..out-1: T₁, out..2·out-1: T₂
    N.plane_scale     f32    [2, out]                            α₁ (row 0), α₂ (row 1)

The two planes are stacked along the output dim, so they are one ordinary ternary matrix
[2·out, in] in any packing (i2 × 2: 4 bits per weight; tq1 × 2: 3.2), and one call of the packed
ternary kernel with scale 1 runs both GEMVs over one int8 quantization of x:

    z = ternary_linear(x; [T₁; T₂], s_w = 1) = (x_int @ [T₁; T₂]ᵀ) / s_x          [..., 2·out]
    y = α₁ ⊙ z[..., :out] + α₂ ⊙ z[..., out:]

which is PTQTPLinear's function with ``ptqtp.activations = int8`` (the same int8 codes and trits;
only the float order of operations differs). Weight-only models (``activations = fp``) have no
packed form: the kernels multiply int8 activations.
"""

from __future__ import annotations

import torch
from torch import nn

from hgf.errors import HGFError
from hgf.infer.format import PackedHeader, TensorSpec
from hgf.kernels import pack_ternary, packed_shape, ternary_linear
from hgf.model.ptqtp import PTQTPLinear


def ptqtp_specs(name: str, mod: PTQTPLinear, packing: str) -> dict[str, TensorSpec]:
    """The file tensors of one PTQTP projection."""
    return {f"{name}.planes_packed": TensorSpec(
                "U8", packed_shape(2 * mod.out_features, mod.in_features, packing), "ternary"),
            f"{name}.plane_scale": TensorSpec("F32", (2, mod.out_features), "scale")}


def pack_ptqtp(mod: PTQTPLinear, packing: str, name: str = "projection") -> dict[str, torch.Tensor]:
    """The packed buffers of one PTQTPLinear (``name`` only labels errors)."""
    if mod.activations != "int8" or mod.act_bits != 8:
        what = ("ptqtp.activations=fp (weight-only)" if mod.activations != "int8"
                else f"quant.act_bits={mod.act_bits}")
        raise HGFError(f"{name}: the packed runtime multiplies int8 activations; this model uses "
                       f"{what} (convert with --ptqtp.activations=int8)")
    planes = mod.planes.detach().cpu().reshape(2 * mod.out_features, mod.in_features)  # [2·out, in]
    return {"planes_packed": pack_ternary(planes, packing),
            "plane_scale": mod.alpha.detach().float().cpu().contiguous()}


def stored_bits_per_weight(header: PackedHeader) -> float:
    """Bits per projection weight a PTQTP file stores: both packed planes and the row scales."""
    from hgf.model.transformer import build_model

    model = build_model(header.config, device="meta")
    weights = sum(m.out_features * m.in_features for m in model.modules()
                  if isinstance(m, PTQTPLinear))
    b = header.bytes_by_role()
    return 8 * (b["ternary"] + b["scale"]) / max(weights, 1)


class PackedPTQTPLinear(nn.Module):
    """Inference-only PTQTP projection: both trit-planes in one packed ternary matrix."""

    def __init__(self, in_features: int, out_features: int, packing: str, act_eps: float = 1e-5,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packing, self.act_eps = packing, act_eps
        shape = packed_shape(2 * out_features, in_features, packing)
        self.register_buffer("planes_packed", torch.empty(shape, dtype=torch.uint8, device=device))
        self.register_buffer("plane_scale", torch.empty(2, out_features, device=device))

    @classmethod
    def like(cls, layer: PTQTPLinear, packing: str, device: torch.device | str | None = None
             ) -> PackedPTQTPLinear:
        return cls(layer.in_features, layer.out_features, packing, layer.act_eps, device)

    @classmethod
    def from_training(cls, layer: PTQTPLinear, packing: str = "i2") -> PackedPTQTPLinear:
        packed = cls.like(layer, packing, device=layer.planes.device)
        packed.load_state_dict(pack_ptqtp(layer, packing), strict=True)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.out_features
        one = torch.ones((), device=x.device)  # s_w = 1: the row scales come after the GEMV
        z = ternary_linear(x, self.planes_packed, one, self.packing, 2 * o, self.in_features,
                           self.act_eps)  # [..., 2·out]
        a = self.plane_scale.to(z.dtype)
        return z[..., :o] * a[0] + z[..., o:] * a[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packing={self.packing}, 2 trit-planes")
