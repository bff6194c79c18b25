"""The packed runtime: buffer-only ternary projections swapped into the one hgf Transformer.

    PackedTernaryLinear:  y = ternary_linear(x; W_t packed, s_w) + B'(A x) [+ b]
                            (A, B' held transposed at run time: y += (x A_t) B_t, one mm + addmm)
                            = (x_int @ W_tᵀ) / (s_x · s_w) + B'(A x),     B' = g·B

which is the training layer's inference function (BitLinear / HGFLinear, additive fusion; convex
fusion arrives here already folded, see hgf.infer.format; TequilaLinear: + its folded dead-zone
bias b; SherryLinear: packing sherry, or i2/tq1). Nothing is unpacked in ``forward``:
the kernel reads the packed bytes. ``load_packed`` builds the same ``Transformer`` class on the
meta device, swaps every BitLinear for a PackedTernaryLinear (docs/STYLE.md §7), then assigns the
file's tensors as the model's parameters and buffers — one copy of the weights, used for prefill
and for KV-cached decode alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from hgf.errors import HGFError
from hgf.infer.export import pack_projection
from hgf.infer.format import PackedHeader, read_header
from hgf.infer.ptqtp import PackedPTQTPLinear
from hgf.kernels import packed_shape, ternary_linear
from hgf.model.attention import rope_cache
from hgf.model.quant import BitLinear
from hgf.model.roles import modules_with_role, param_roles, role_of
from hgf.model.transformer import Transformer, build_model


class PackedTernaryLinear(nn.Module):
    """Inference-only ternary projection with an optional folded low-rank correction."""

    def __init__(self, in_features: int, out_features: int, packing: str, rank: int = 0,
                 act_eps: float = 1e-5, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packing, self.rank, self.act_eps = packing, rank, act_eps
        shape = packed_shape(out_features, in_features, packing)
        self.register_buffer("weight_packed", torch.empty(shape, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32, device=device))
        if rank:  # stored transposed, so the decode step is one mm and one addmm
            self.register_buffer("A_t", torch.empty(in_features, rank, device=device, dtype=dtype))
            self.register_buffer("B_t", torch.empty(rank, out_features, device=device, dtype=dtype))
        else:
            self.A_t = self.B_t = None
        if bias:  # Tequila's folded dead-zone bias [out]
            self.register_buffer("bias", torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.bias = None

    @classmethod
    def like(cls, layer: BitLinear, packing: str, device: torch.device | str | None = None
             ) -> PackedTernaryLinear:
        """An empty packed layer with the dims of a training layer."""
        bias = any(role == "bias" for *_, role in param_roles(layer))  # Tequila's folded bias
        return cls(layer.in_features, layer.out_features, packing, layer.rank, layer.act_eps,
                   device, bias=bias)

    @classmethod
    def from_training(cls, layer: BitLinear, packing: str = "i2",
                      dtype: torch.dtype = torch.float32) -> PackedTernaryLinear:
        """Convert one training layer (what export does for every projection of a model)."""
        state = pack_projection(layer, packing)
        if "A" in state:
            state["A_t"] = state.pop("A").to(dtype).t().contiguous()  # [in, r]
            state["B_t"] = state.pop("B").to(dtype).t().contiguous()  # [r, out]
        if "bias" in state:
            state["bias"] = state["bias"].to(dtype)
        packed = cls.like(layer, packing, device="meta")
        packed.load_state_dict(state, strict=True, assign=True)
        return packed.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ternary_linear(x, self.weight_packed, self.weight_scale, self.packing,
                           self.out_features, self.in_features, self.act_eps)
        if self.bias is not None:
            y = y + self.bias
        if self.A_t is None:
            return y
        x2 = x.reshape(-1, self.in_features)  # [tokens, in]
        y2 = torch.addmm(y.reshape(-1, self.out_features), torch.mm(x2, self.A_t), self.B_t)
        return y2.view(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packing={self.packing}, rank={self.rank}")


def swap_packed_layers(model: nn.Module, packing: str) -> None:
    """Replace every ternary projection (BitLinear/HGFLinear) and two-plane PTQTP projection
    (hgf.infer.ptqtp) of ``model`` in place by an empty packed layer."""
    targets = [*modules_with_role(model, "ternary"), *modules_with_role(model, "ptqtp")]
    for name, mod in targets:
        parent, _, child = name.rpartition(".")
        if role_of(name, mod) == "ptqtp":
            new = PackedPTQTPLinear.like(mod, packing, mod.planes.device)
        else:
            new = PackedTernaryLinear.like(mod, packing, mod.weight.device)
        setattr(model.get_submodule(parent), child, new)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Compute dtype of the full-precision parts: float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def runtime_state(tensors: dict[str, torch.Tensor], header: PackedHeader,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """File tensors -> the packed model's state dict: packed bytes and scales as stored,
    full-precision parts cast once to ``dtype`` (A, B' also transposed once), int8 embedding
    rows dequantized."""
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        spec = header.tensors[name]
        if name.endswith(".row_scale"):
            continue
        if spec.role in ("ternary", "scale"):
            state[name] = t
        elif spec.role == "bias":
            state[name] = t.to(dtype)
        elif spec.role == "correction":  # A [r, in] -> A_t [in, r];  B' [out, r] -> B_t [r, out]
            state[f"{name}_t"] = t.to(dtype).t().contiguous()
        elif spec.dtype == "I8":
            scale = tensors[name.removesuffix("weight") + "row_scale"]
            state[name] = (t.float() * scale[:, None]).to(dtype)  # [vocab, d]
        else:
            state[name] = t.to(dtype)
    if header.config.model.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def load_packed(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> tuple[Transformer, PackedHeader]:
    """Load an exported file as a ``Transformer`` with packed projections (eval mode)."""
    header = read_header(path)
    dtype = dtype or default_dtype(device)
    try:
        tensors = load_file(str(header.path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise HGFError(f"{header.path}: cannot read tensors: {str(e).splitlines()[0]}") from None
    cfg = header.config
    model = build_model(cfg, device="meta")
    swap_packed_layers(model, header.packing)
    model.load_state_dict(runtime_state(tensors, header, dtype), strict=True, assign=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    m = cfg.model
    cos, sin = rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise HGFError(f"{header.path}: tensor {left[0]} was not loaded")
    return model.eval().requires_grad_(False), header
