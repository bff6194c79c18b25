import math

import pytest
import torch

from hgf.config import load_config
from hgf.model import build_model
from hgf.model.attention import DifferentialAttention, StandardAttention, apply_rope, rope_cache


def _cfg(attention, linear="dense", **model):
    over = [f"--model.attention={attention}", f"--model.linear={linear}"]
    over += [f"--model.{k}={v}" for k, v in model.items()]
    return load_config(None, over)


def _reference_diff_attention(attn: DifferentialAttention, x, cos, sin):
    """Straightforward loops over heads with an explicit causal mask."""
    b, t, d_model = x.shape
    h, d = attn.n_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, 2 * h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, 2 * h, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, h, 2 * d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    lam = (math.exp(float(attn.lambda_q1.detach() @ attn.lambda_k1.detach()))
           - math.exp(float(attn.lambda_q2.detach() @ attn.lambda_k2.detach())) + attn.lambda_init)
    mask = torch.full((t, t), float("-inf")).triu(1)
    heads = []
    for i in range(h):
        a1 = torch.softmax(q[:, 2 * i] @ k[:, 2 * i].transpose(-1, -2) / math.sqrt(d) + mask, -1)
        a2 = torch.softmax(q[:, 2 * i + 1] @ k[:, 2 * i + 1].transpose(-1, -2) / math.sqrt(d) + mask, -1)
        o = (a1 - lam * a2) @ v[:, i]  # [b, t, 2d]
        rms = o.pow(2).mean(-1, keepdim=True).add(attn.head_norm.eps).rsqrt()
        heads.append(o * rms * attn.head_norm.weight * (1 - attn.lambda_init))
    y = torch.cat(heads, dim=-1)  # [b, t, h*2d]
    return attn.o_proj(attn.subln(y))


@pytest.mark.parametrize("layer_idx", [0, 3])
def test_differential_attention_matches_reference(layer_idx):
    cfg = _cfg("differential")
    attn = DifferentialAttention(cfg, layer_idx, rank=0)
    with torch.no_grad():
        attn.head_norm.weight.uniform_(0.5, 1.5)
    assert attn.n_heads == cfg.model.n_heads // 2
    assert attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer_idx))
    x = torch.randn(2, 9, cfg.model.d_model)
    cos, sin = rope_cache(attn.head_dim, 9, cfg.model.rope_theta)
    torch.testing.assert_close(attn(x, cos, sin), _reference_diff_attention(attn, x, cos, sin),
                               rtol=1e-4, atol=1e-5)


def test_lambda_parameters_shape_and_init():
    attn = DifferentialAttention(_cfg("differential"), 1, rank=0)
    for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2):
        assert p.shape == (attn.head_dim,)
    assert attn.v_proj.out_features == _cfg("differential").model.d_model


def test_standard_attention_matches_explicit_softmax():
    cfg = _cfg("standard")
    attn = StandardAttention(cfg, 0, rank=0)
    x = torch.randn(1, 6, cfg.model.d_model)
    cos, sin = rope_cache(attn.head_dim, 6, cfg.model.rope_theta)
    h, d = attn.n_heads, attn.head_dim
    q = apply_rope(attn.q_proj(x).view(1, 6, h, d).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(1, 6, h, d).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(1, 6, h, d).transpose(1, 2)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, -1) @ v
    ref = attn.o_proj(y.transpose(1, 2).reshape(1, 6, -1))
    torch.testing.assert_close(attn(x, cos, sin), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arm", ["fp16", "bitnet", "diff_only", "hgf", "hgf_std", "bitnet_diff"])
def test_causal_future_token_never_changes_past(arm):
    cfg = load_config(f"configs/{arm}.toml")
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % cfg.model.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[0, :10], b[0, :10])
    assert not torch.equal(a[0, 10:], b[0, 10:])


@pytest.mark.parametrize("arm", ["fp16", "hgf"])
def test_kv_cache_decode_equals_full_forward(arm):
    cfg = load_config(f"configs/{arm}.toml")
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(idx)
        model.setup_caches(2, 32)
        parts = [model(idx[:, :10], start=0), model(idx[:, 10:11], start=10),
                 model(idx[:, 11:], start=11)]
        model.clear_caches()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
