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
        if m.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        m = self.cfg.model
        std = m.init_std
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                out_std = std / math.sqrt(2 * m.n_layers) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(mod.weight, 0.0, out_std)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std)
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
