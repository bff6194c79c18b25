"""The one decoder every arm is built from.

Pre-norm blocks  h = x + Attn(RMSNorm(x)),  y = h + MLP(RMSNorm(h));  RoPE; gated MLP (SwiGLU or
squared-ReLU GLU); no biases; embeddings and LM head full precision (optionally tied). The arm
only changes which linear (``model.linear``) and which attention (``model.attention``) is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgf.config import Config, subln_enabled
from hgf.model.attention import ATTENTIONS, rope_cache
from hgf.model.hgf_linear import HGFLinear
from hgf.model.init import children_first, normal_, reset_own
from hgf.model.linear import make_linear, resolve_rank


class MLP(nn.Module):
    def __init__(self, cfg: Config, rank: int) -> None:
        super().__init__()
        m = cfg.model
        self.act = m.mlp
        self.gate_proj = make_linear("gate_proj", m.d_model, m.d_ff, cfg, rank)
        self.up_proj = make_linear("up_proj", m.d_model, m.d_ff, cfg, rank)
        self.down_proj = make_linear("down_proj", m.d_ff, m.d_model, cfg, rank)
        self.subln = nn.RMSNorm(m.d_ff, eps=m.norm_eps) if subln_enabled(m) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "swiglu" else F.relu(g).square()
        return self.down_proj(self.subln(g * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int, rank: int) -> None:
        super().__init__()
        m = cfg.model
        self.attn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = ATTENTIONS[m.attention](cfg, layer_idx, rank)
        self.mlp_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.mlp = MLP(cfg, rank)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.rank = resolve_rank(cfg) if m.linear == "hgf" else 0
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, self.rank) for i in range(m.n_layers))
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """With ``model.tie_embeddings`` the LM head shares the embedding's weight (``to_empty``
        unties them: :func:`materialize` ties them again)."""
        if self.cfg.model.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place from the global RNG, exactly as
        ``Transformer(cfg)`` does on the device they are on: after ``to_empty`` on a model built
        on the meta device, sharded (FSDP2, every rank seeded alike) or not. The constructors'
        draws are replayed first so that the RNG stands where an eager build's does
        (hgf.model.init)."""
        for mod in children_first(self):  # this module last
            reset_own(mod)
        self.reset_parameters()

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        """The RoPE tables (hgf.model.init.reset_own), computed where an eager build computes
        them."""
        m = self.cfg.model
        with torch.device(self.rope_cos.device):
            cos, sin = rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The model's init: projections and embedding N(0, init_std²) (output projections scaled
        by 1/√(2L)), then each HGF correction (``hgf.init``). Sharded parameters: hgf.model.init."""
        m = self.cfg.model
        std = m.init_std
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                out_std = std / math.sqrt(2 * m.n_layers) if name.endswith(("o_proj", "down_proj")) else std
                normal_(mod.weight, out_std)
            elif isinstance(mod, nn.Embedding):
                normal_(mod.weight, std)
        for mod in self.modules():
            if isinstance(mod, HGFLinear):
                mod.reset_correction()
                if self.cfg.hgf.init == "svd" and mod.weight.device.type != "meta":
                    mod.init_from_residual_svd()

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """idx ``[b, t]`` token ids at positions start..start+t -> logits ``[b, t, vocab]``."""
        t = idx.shape[1]
        if start + t > self.cfg.model.max_seq_len:
            raise ValueError(f"sequence of {start + t} exceeds model.max_seq_len="
                             f"{self.cfg.model.max_seq_len}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.tok_emb(idx)  # [b, t, d]
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        return self.lm_head(self.norm(x))

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache per layer (for incremental decoding)."""
        p = self.tok_emb.weight
        for layer in self.layers:
            layer.attn.setup_cache(batch, max_len, dtype or p.dtype, p.device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attn.cache = None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in nats, computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: Config, device: torch.device | str | None = None) -> Transformer:
    """Build the arm described by ``cfg`` (``device="meta"`` allocates nothing)."""
    if device is None:
        return Transformer(cfg)
    with torch.device(device):
        return Transformer(cfg)


def materialize(model: Transformer, device: torch.device | str) -> Transformer:
    """Allocate a model built on the meta device (and possibly sharded since) on ``device`` and
    initialise it (docs/STYLE.md §15): under the same seed its weights and buffers equal those of
    ``build_model(cfg, device)``, bit for bit; a sharded model's ranks hold their parts of them."""
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights()
    return model
