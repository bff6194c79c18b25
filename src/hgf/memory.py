"""Memory accounting (docs/METHOD.md §5).

    overhead = bytes(A, B, gates in FP16) / bytes(ternary backbone at its packed bits per weight)

The backbone is every ternary projection weight, packed, plus one float32 scale per tensor.
Packings (exact bytes per tensor ``[out, in]``, packed along the input dim row by row):
    i2       2 bits/weight, 4 per byte:          out · ceil(in / 4)
    tq1      1.6 bits/weight, 5 trits per byte:  out · ceil(in / 5)
    sherry   1.25 bits/weight, 3:4 sparse ternary only (model.linear = sherry), 5 bits per 4
             weights: out · (20 · (in // 128) + ceil(g / 2) + ceil(g / 8)), g = ceil((in mod 128) / 4)
    entropy  log2(3) bits/weight (the limit):    out · in · log2(3) / 8
Tequila's folded dead-zone bias is float32, one per output row of each projection
(``bias_bytes``, part of the total). The correction (A, B) and the gates are FP16 (2 bytes);
embeddings, LM head, norms and the λ vectors of differential attention are FP16 too. Counts come
from walking a model built on the meta device, so the report describes exactly the modules the
model has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from hgf.config import Config, kv_heads
from hgf.model.linear import TARGETS, block_projections

PACKINGS = ("i2", "tq1", "sherry", "entropy")
BITS = {"i2": 2.0, "tq1": 1.6, "sherry": 1.25, "entropy": math.log2(3)}
FP16 = 2
SCALE_BYTES = 4


def packed_bytes(out_features: int, in_features: int, packing: str) -> float:
    """Bytes of one packed ternary weight ``[out, in]`` (without its scale)."""
    if packing == "i2":
        return out_features * math.ceil(in_features / 4)
    if packing == "tq1":
        return out_features * math.ceil(in_features / 5)
    if packing == "sherry":
        g = math.ceil(in_features % 128 / 4)
        return out_features * (20 * (in_features // 128) + math.ceil(g / 2) + math.ceil(g / 8))
    if packing == "entropy":
        return out_features * in_features * math.log2(3) / 8
    raise ValueError(f"unknown packing {packing!r} (known: {', '.join(PACKINGS)})")


@dataclass
class MemoryReport:
    ternary_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) per tensor
    correction_params: int = 0  # A and B elements
    n_gates: int = 0
    dense_params: int = 0  # full-precision block projections (fp16 / diff_only arms)
    embedding_params: int = 0
    head_params: int = 0  # 0 when tied to the embedding
    other_params: int = 0  # norms, λ vectors
    bias_rows: int = 0  # Tequila: float32 dead-zone bias entries (one per output row)
    sparse34: bool = False  # Sherry: the backbone is 3:4 sparse (the sherry packing applies)

    @property
    def packings(self) -> tuple[str, ...]:
        """The packings this model can be stored in (sherry: 3:4 sparse models only)."""
        return PACKINGS if self.sparse34 else tuple(p for p in PACKINGS if p != "sherry")

    @property
    def ternary_params(self) -> int:
        return sum(o * i for o, i in self.ternary_shapes)

    @property
    def total_params(self) -> int:
        return (self.ternary_params + self.correction_params + self.n_gates + self.dense_params
                + self.embedding_params + self.head_params + self.other_params)

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


def memory_report(model: nn.Module) -> MemoryReport:
    """Count the bytes of every component of a built model (meta device is fine)."""
    from hgf.model.hgf_linear import HGFLinear
    from hgf.model.quant import BitLinear
    from hgf.model.sherry import SherryLinear
    from hgf.model.tequila import TequilaLinear

    rep = MemoryReport()
    seen: set[int] = set()
    for name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            n = p.numel()
            if isinstance(mod, BitLinear) and p_name == "weight":
                rep.ternary_shapes.append((p.shape[0], p.shape[1]))
                if isinstance(mod, TequilaLinear):
                    rep.bias_rows += p.shape[0]
                rep.sparse34 = rep.sparse34 or isinstance(mod, SherryLinear)
            elif isinstance(mod, TequilaLinear) and p_name == "bias_lambda":
                continue  # folded into the bias at export
            elif isinstance(mod, HGFLinear) and p_name in ("A", "B"):
                rep.correction_params += n
            elif isinstance(mod, HGFLinear) and p_name == "gate":
                rep.n_gates += n
            elif isinstance(mod, nn.Embedding):
                rep.embedding_params += n
            elif name.endswith("lm_head"):
                rep.head_params += n
            elif isinstance(mod, nn.Linear):
                rep.dense_params += n
            else:
                rep.other_params += n
    return rep


def report_for_config(cfg: Config) -> MemoryReport:
    from hgf.model.transformer import build_model

    return memory_report(build_model(cfg, device="meta"))


def rank_for_overhead(cfg: Config, target: float, bits: float | None = None) -> int:
    """Largest rank r whose correction overhead (vs the ternary backbone at ``bits`` per weight,
    scales included, embeddings excluded) does not exceed ``target``; at least 1."""
    m, h = cfg.model, cfg.hgf
    bits = h.overhead_bits if bits is None else bits
    projs = block_projections(m.d_model, m.d_ff, kv_heads(m) * (m.d_model // m.n_heads))
    backbone = m.n_layers * sum(i * o * bits / 8 + SCALE_BYTES for _, i, o in projs)
    targeted = [(i, o) for role, i, o in projs if role in TARGETS[h.targets]]
    per_rank = m.n_layers * FP16 * sum(i + o for i, o in targeted)
    gates = m.n_layers * FP16 * len(targeted)
    return max(1, math.floor((target * backbone - gates) / per_rank))


def resolve_rank(cfg: Config) -> int:
    h = cfg.hgf
    return rank_for_overhead(cfg, h.target_overhead) if h.target_overhead > 0 else h.rank


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
