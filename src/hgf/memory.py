"""Memory accounting (docs/METHOD.md §5).

    overhead = bytes(A, B, gates in FP16) / bytes(ternary backbone at its packed bits per weight)

The backbone is every ternary projection weight, packed, plus one float32 scale per tensor.
Packings come from the one registry, hgf.kernels.packing (exact bytes per tensor ``[out, in]``,
packed along the input dim row by row):
    i2       2 bits/weight, 4 per byte:          out · ceil(in / 4)
    tq1      1.6 bits/weight, 5 trits per byte:  out · ceil(in / 5)
    sherry   1.25 bits/weight, 3:4 sparse ternary only (model.linear = sherry), 5 bits per 4
             weights (hgf.kernels.sherry.sherry_row_bytes)
    entropy  log2(3) bits/weight (the limit):    out · in · log2(3) / 8
The correction (A, B) and the gates are FP16 (2 bytes): one gate per projection, one per output
channel (``hgf.gate_mode = channel``) or d_out + 1 (an input gate's projection w and bias α);
embeddings, LM head, norms and the λ vectors of differential attention are FP16 too. Counts come
from walking a model built on the meta device, by the role each parameter has (hgf.model.roles),
so the report describes exactly the modules the model has. Tequila's folded dead-zone bias
is float32, one per output row of each projection (``bias_bytes``, part of the total); the
sherry packing is listed for 3:4 sparse models only (``MemoryReport.packings``). The rank rule
(``hgf.target_overhead``) is beside the projections, in hgf.model.linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hgf.config import Config
from hgf.kernels.packing import ACCOUNTED, PACKING_REGISTRY
from hgf.model.linear import FP16, SCALE_BYTES, rank_for_overhead, resolve_rank
from hgf.model.roles import param_roles
from hgf.model.transformer import build_model

PACKINGS = ACCOUNTED  # every packing of the registry, the entropy limit included
BITS = {name: p.bits for name, p in PACKING_REGISTRY.items()}
__all__ = ["BITS", "FP16", "PACKINGS", "SCALE_BYTES", "MemoryReport", "format_report",
           "memory_report", "packed_bytes", "rank_for_overhead", "report_for_config",
           "resolve_rank"]


def packed_bytes(out_features: int, in_features: int, packing: str) -> float:
    """Bytes of one packed ternary weight ``[out, in]`` (without its scale)."""
    p = PACKING_REGISTRY.get(packing)
    if p is None:
        raise ValueError(f"unknown packing {packing!r} (known: {', '.join(PACKINGS)})")
    return p.tensor_bytes(out_features, in_features)


@dataclass
class MemoryReport:
    ternary_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) per tensor
    correction_params: int = 0  # A and B elements
    n_gates: int = 0
    dense_params: int = 0  # full-precision block projections (fp16 / diff_only arms)
    embedding_params: int = 0
    head_params: int = 0  # 0 when tied to the embedding
    other_params: int = 0  # norms, λ vectors
    bias_params: int = 0  # Tequila: its λ (folded into the bias at export)
    bias_rows: int = 0  # Tequila: float32 dead-zone bias entries (one per output row)
    sparsity: str | None = None  # the backbone's W_t pattern ("3:4": Sherry), None = any

    @property
    def packings(self) -> tuple[str, ...]:
        """The packings this model can be stored in (a packing with a ``sparsity``, sherry:
        the models of that pattern only)."""
        return tuple(p for p in PACKINGS
                     if PACKING_REGISTRY[p].sparsity in (None, self.sparsity))

    @property
    def ternary_params(self) -> int:
        return sum(o * i for o, i in self.ternary_shapes)

    @property
    def total_params(self) -> int:
        return (self.ternary_params + self.correction_params + self.n_gates + self.dense_params
                + self.embedding_params + self.head_params + self.other_params
                + self.bias_params)

    def backbone_bytes(self, packing: str) -> float:
        return (sum(packed_bytes(o, i, packing) for o, i in self.ternary_shapes)
                + SCALE_BYTES * len(self.ternary_shapes))

    @property
    def correction_bytes(self) -> int:
        return FP16 * (self.correction_params + self.n_gates)

    @property
    def embedding_bytes(self) -> int:
        return FP16 * (self.embedding_params + self.head_params)

    @property
    def fp16_rest_bytes(self) -> int:
        return FP16 * (self.dense_params + self.other_params)

    def overhead(self, packing: str, with_embeddings: bool = False) -> float | None:
        """Correction bytes / backbone bytes (optionally + embeddings and head)."""
        denom = self.backbone_bytes(packing) + (self.embedding_bytes if with_embeddings else 0)
        return self.correction_bytes / denom if self.ternary_shapes else None

    @property
    def bias_bytes(self) -> int:
        return SCALE_BYTES * self.bias_rows

    def total_bytes(self, packing: str) -> float:
        return (self.backbone_bytes(packing) + self.correction_bytes + self.embedding_bytes
                + self.fp16_rest_bytes + self.bias_bytes)

    @property
    def fp16_bytes(self) -> int:
        """The same model stored entirely in FP16 (the dense reference)."""
        return FP16 * self.total_params

    def as_dict(self) -> dict:
        d = {
            "params": {
                "ternary": self.ternary_params, "correction": self.correction_params,
                "gates": self.n_gates, "dense": self.dense_params,
                "embedding": self.embedding_params, "head": self.head_params,
                "other": self.other_params, "total": self.total_params,
            },
            "correction_bytes": self.correction_bytes,
            "embedding_bytes": self.embedding_bytes,
            "fp16_bytes": self.fp16_bytes,
        }
        for p in self.packings:
            d[p] = {
                "backbone_bytes": self.backbone_bytes(p),
                "total_bytes": self.total_bytes(p),
                "overhead": self.overhead(p),
                "overhead_with_embeddings": self.overhead(p, True),
                "reduction_vs_fp16": 1 - self.total_bytes(p) / self.fp16_bytes,
            }
        return d


# the MemoryReport counter of each parameter role (hgf.model.roles); "ternary" keeps shapes
COUNTERS = {"correction": "correction_params", "gate": "n_gates", "dense": "dense_params",
            "embedding": "embedding_params", "head": "head_params", "other": "other_params",
            "bias": "bias_params"}


def memory_report(model: nn.Module) -> MemoryReport:
    """Count the bytes of every component of a built model (meta device is fine), by the role
    of each parameter (hgf.model.roles; tied weights count once)."""
    rep = MemoryReport()
    for _, mod, _, p, role in param_roles(model):
        if role == "ternary":
            rep.ternary_shapes.append((p.shape[0], p.shape[1]))
            rep.sparsity = getattr(mod, "hgf_sparsity", None) or rep.sparsity
        else:
            counter = COUNTERS[role]
            setattr(rep, counter, getattr(rep, counter) + p.numel())
            if role == "bias":  # λ stands for the float32 bias [out] it is folded into
                rep.bias_rows += mod.out_features
    return rep


def report_for_config(cfg: Config) -> MemoryReport:
    return memory_report(build_model(cfg, device="meta"))


def format_report(rep: MemoryReport) -> str:
    """A human-readable table of the report."""
    mib = 1024 * 1024
    lines = [
        "parameters by component:",
        f"  ternary projections   {rep.ternary_params:>14,} in {len(rep.ternary_shapes)} tensors",
        f"  correction A, B       {rep.correction_params:>14,}",
        f"  gates                 {rep.n_gates:>14,}",
        f"  dense projections     {rep.dense_params:>14,}",
        f"  embedding             {rep.embedding_params:>14,}",
        f"  LM head               {rep.head_params:>14,}",
        f"  norms, λ              {rep.other_params:>14,}",
        f"  total                 {rep.total_params:>14,}",
        "",
        f"FP16 model: {rep.fp16_bytes / mib:.3f} MiB   correction+gates (FP16): "
        f"{rep.correction_bytes / mib:.3f} MiB   embeddings+head (FP16): "
        f"{rep.embedding_bytes / mib:.3f} MiB",
        f"{'packing':<9}{'bits/w':>7}{'backbone MiB':>14}{'total MiB':>11}{'vs FP16':>9}"
        f"{'overhead':>10}{'w/ emb':>8}",
    ]
    for p in rep.packings:
        ov, ove = rep.overhead(p), rep.overhead(p, True)
        lines.append(
            f"{p:<9}{BITS[p]:>7.3f}{rep.backbone_bytes(p) / mib:>14.3f}"
            f"{rep.total_bytes(p) / mib:>11.3f}{1 - rep.total_bytes(p) / rep.fp16_bytes:>8.1%} "
            f"{'-' if ov is None else f'{ov:.2%}':>9}{'-' if ove is None else f'{ove:.2%}':>8}"
        )
    return "\n".join(lines)
