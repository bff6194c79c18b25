"""Attention: standard multi-head (SDPA) and differential attention V1, both with RoPE and an
optional static KV cache.

Standard attention may be grouped-query (``model.n_kv_heads`` < ``model.n_heads``, Llama 2/3
style): ``k_proj``/``v_proj`` map to ``n_kv_heads`` heads and query head j reads K/V head
``j // (n_heads / n_kv_heads)``; the cache holds the ``n_kv_heads`` heads.

Differential attention (Ye et al., 2024; docs/METHOD.md §3) with H = n_heads / 2 heads of head dim
d_h = d_model / n_heads. Each head has two query/key halves of size d_h and one value of 2·d_h:
    A_i = softmax(Q_i K_iᵀ / sqrt(d_h) + causal mask),      head = (A_1 − λ A_2) V
    λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init,         λ_init = 0.8 − 0.6·exp(−0.3·layer)
then a per-head RMSNorm over 2·d_h, times (1 − λ_init), heads concatenated, output projection.
Since (A_1 − λA_2)V = A_1V − λ A_2V, each half runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hgf.config import Config, kv_heads, subln_enabled
from hgf.model.init import init_
from hgf.model.linear import make_linear


def rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables ``[max_len, head_dim]`` (half-split convention, float32)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # [T, d/2]
    ang = torch.cat([ang, ang], dim=-1)  # [T, d]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[b, h, t, d]``; cos/sin ``[t, d]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache: keys ``[b, hk, max_len, dk]`` and values ``[b, hv, max_len, dv]``."""

    def __init__(self, batch: int, k_heads: int, k_dim: int, v_heads: int, v_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, k_heads, max_len, k_dim, dtype=dtype,
                                              device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, v_heads, max_len, v_dim, dtype=dtype,
                                              device=device), persistent=False)

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        """An empty cache (hgf.model.init.reset_own)."""
        self.k.zero_()
        self.v.zero_()

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked for {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of ``q`` (positions start..start+t) over keys 0..start+t; fewer K/V heads
    than query heads is grouped-query attention."""
    t, s = q.shape[2], k.shape[2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if start == 0 and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, **gqa)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class _AttentionBase(nn.Module):
    def __init__(self, cfg: Config, rank: int, kv_dim: int | None = None) -> None:
        super().__init__()
        m = cfg.model
        d = m.d_model
        kv_dim = kv_dim or d
        self.head_dim = d // m.n_heads
        self.q_proj = make_linear("q_proj", d, d, cfg, rank)
        self.k_proj = make_linear("k_proj", d, kv_dim, cfg, rank)
        self.v_proj = make_linear("v_proj", d, kv_dim, cfg, rank)
        self.o_proj = make_linear("o_proj", d, d, cfg, rank)
        self.subln = nn.RMSNorm(d, eps=m.norm_eps) if subln_enabled(m) else nn.Identity()
        self.cache: KVCache | None = None

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """y ``[b, heads, t, hd]`` -> ``[b, t, d_model]`` through SubLN and o_proj."""
        b, _, t, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t, -1)  # [b, t, d]
        return self.o_proj(self.subln(y))


class StandardAttention(_AttentionBase):
    def __init__(self, cfg: Config, layer_idx: int, rank: int) -> None:
        m = cfg.model
        super().__init__(cfg, rank, kv_heads(m) * (m.d_model // m.n_heads))
        self.n_heads, self.n_kv_heads = m.n_heads, kv_heads(m)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> None:
        hk, d = self.n_kv_heads, self.head_dim
        self.cache = KVCache(batch, hk, d, hk, d, max_len, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        h, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)  # [b, h, t, d]
        k = self.k_proj(x).view(b, t, hk, d).transpose(1, 2)  # [b, hk, t, d]
        v = self.v_proj(x).view(b, t, hk, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)
        return self.output(_sdpa(q, k, v, start))


def lambda_init_for(layer_idx: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DifferentialAttention(_AttentionBase):
    def __init__(self, cfg: Config, layer_idx: int, rank: int) -> None:
        super().__init__(cfg, rank)
        self.n_heads = cfg.model.n_heads // 2  # H differential heads
        d = self.head_dim
        self.lambda_init = lambda_init_for(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.empty(d))
        self.lambda_k1 = nn.Parameter(torch.empty(d))
        self.lambda_q2 = nn.Parameter(torch.empty(d))
        self.lambda_k2 = nn.Parameter(torch.empty(d))
        self.reset_own_parameters()
        self.head_norm = nn.RMSNorm(2 * d, eps=cfg.model.norm_eps)

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        """The λ vectors ~ N(0, 0.1²), drawn as ``randn(d) · 0.1`` (hgf.model.init.reset_own)."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            init_(p, lambda x: x.normal_().mul_(0.1))

    def lambda_full(self) -> torch.Tensor:
        l1 = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        l2 = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> None:
        h, d = self.n_heads, self.head_dim
        self.cache = KVCache(batch, 2 * h, d, h, 2 * d, max_len, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q = self.q_proj(x).view(b, t, 2 * h, d).transpose(1, 2)  # [b, 2h, t, d]
        k = self.k_proj(x).view(b, t, 2 * h, d).transpose(1, 2)  # [b, 2h, t, d]
        v = self.v_proj(x).view(b, t, h, 2 * d).transpose(1, 2)  # [b, h, t, 2d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)
        # heads 2i and 2i+1 are the two halves of differential head i
        o1 = _sdpa(q[:, 0::2], k[:, 0::2], v, start)  # [b, h, t, 2d]
        o2 = _sdpa(q[:, 1::2], k[:, 1::2], v, start)
        lam = self.lambda_full().to(o1.dtype)
        y = self.head_norm(o1 - lam * o2) * (1.0 - self.lambda_init)  # [b, h, t, 2d]
        return self.output(y)


ATTENTIONS = {"standard": StandardAttention, "differential": DifferentialAttention}
