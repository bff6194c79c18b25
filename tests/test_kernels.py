import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hgf.kernels import (
    pack_ternary,
    packed_shape,
    ternary_linear,
    ternary_linear_reference,
    unpack_ternary,
)
from hgf.memory import packed_bytes
from hgf.model.quant import BitLinear, act_quant, ternarize

PACKINGS = ["i2", "tq1"]


def random_ternary(out_f: int, in_f: int, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(-1, 2, (out_f, in_f), dtype=torch.int8, generator=gen)


@settings(max_examples=60, deadline=None)
@given(out_f=st.integers(0, 9), in_f=st.integers(0, 700), packing=st.sampled_from(PACKINGS),
       seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip_and_byte_count(out_f, in_f, packing, seed):
    w = random_ternary(out_f, in_f, torch.Generator().manual_seed(seed))
    p = pack_ternary(w, packing)
    assert p.dtype == torch.uint8 and tuple(p.shape) == packed_shape(out_f, in_f, packing)
    assert p.numel() == packed_bytes(out_f, in_f, packing)
    assert torch.equal(unpack_ternary(p, packing, out_f, in_f), w)
    assert (p <= (255 if packing == "i2" else 242)).all()


def test_pack_float_input_same_as_int():
    w = random_ternary(5, 77)
    for packing in PACKINGS:
        assert torch.equal(pack_ternary(w.float(), packing), pack_ternary(w, packing))


def test_layout_by_hand():
    # i2, in=10: 3 bytes, one group of G=3; byte j holds weights j, 3+j, 6+j, 9+j (code = w+1,
    # padding = weight 0 = code 1) as base-4 digits
    w = torch.tensor([[1, 0, -1, 1, 1, 1, 0, 0, 0, -1]])
    c = [2, 1, 0, 2, 2, 2, 1, 1, 1, 0, 1, 1]
    expect = [c[j] + 4 * c[3 + j] + 16 * c[6 + j] + 64 * c[9 + j] for j in range(3)]
    assert pack_ternary(w, "i2").tolist() == [expect] == [[26, 89, 88]]
    # tq1, in=10: 2 bytes, byte j holds weights j, 2+j, 4+j, 6+j, 8+j as base-3 digits
    expect = [sum(c[2 * k + j] * 3**k for k in range(5)) for j in range(2)]
    assert pack_ternary(w, "tq1").tolist() == [expect]
    # i2, in=4096: 16 full groups of 64 bytes; byte 5 holds weights 5, 69, 133, 197
    w = torch.zeros(1, 4096, dtype=torch.int8)
    w[0, 197] = 1
    p = pack_ternary(w, "i2")
    assert p[0, 5] == 1 + 4 + 16 + 64 * 2 and (p[0, 6:] == 85).all()
    # full groups then a tail group: in=300 (tq1) -> 60 bytes; in=700 (tq1) -> 140 = 64+64+12
    w = torch.zeros(1, 700, dtype=torch.int8)
    w[0, 640 + 2 * 12 + 3] = -1  # tail group g=2, G=12: digit 2 of byte 3
    p = pack_ternary(w, "tq1")
    assert p.shape == (1, 140) and p[0, 128 + 3] == 121 - 9


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="in \\{-1, 0, 1\\}"):
        pack_ternary(torch.tensor([[2, 0]]), "i2")
    with pytest.raises(ValueError, match="not integers"):
        pack_ternary(torch.tensor([[0.5, 0.0]]), "tq1")
    with pytest.raises(ValueError, match="unknown packing"):
        pack_ternary(torch.zeros(2, 2), "i3")
    with pytest.raises(ValueError, match="uint8 of shape"):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), "i2", 2, 16)


def bitlinear_and_packed(out_f: int, in_f: int, packing: str):
    bl = BitLinear(in_f, out_f)
    w_t, s_w = ternarize(bl.weight)
    return bl, pack_ternary(w_t, packing), s_w


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 700, 37), (2, 5, 1), (4, 2048, 96)])
def test_reference_matches_bitlinear(packing, shape):
    m, in_f, out_f = shape
    bl, packed, s_w = bitlinear_and_packed(out_f, in_f, packing)
    x = torch.randn(m, in_f)
    with torch.no_grad():
        want = bl(x)
    got = ternary_linear_reference(x, packed, s_w, packing, out_f, in_f)
    # BitLinear rounds x_int/s_x and W_t/s_w before a float32 matmul; we sum exact integers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("packing", PACKINGS)
def test_ternary_linear_matches_bitlinear_batched(packing):
    bl, packed, s_w = bitlinear_and_packed(40, 300, packing)
    x = torch.randn(2, 3, 300)
    with torch.no_grad():
        want = bl(x)
    got = ternary_linear(x, packed, s_w, packing, 40, 300)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_reference_integer_math_by_hand():
    w = torch.tensor([[1, -1, 0], [0, 1, 1]])
    x = torch.tensor([[1.0, -0.5, 0.25]])
    x_int, s_x = act_quant(x)  # [127, -64, 32], s_x = 127
    s_w = torch.tensor(2.0)
    y = ternary_linear_reference(x, pack_ternary(w, "i2"), s_w, "i2", 2, 3)
    assert torch.equal(y, torch.tensor([[(127 + 64) / 254.0, (-64 + 32) / 254.0]]))


@pytest.mark.parametrize("packing", PACKINGS)
def test_zero_token_and_zero_weights_no_nan(packing):
    packed = pack_ternary(torch.zeros(8, 50), packing)
    x = torch.randn(3, 50)
    x[1] = 0
    s_w = ternarize(torch.zeros(8, 50))[1]
    y = ternary_linear(x, packed, s_w, packing, 8, 50)
    assert torch.isfinite(y).all() and (y == 0).all()
    _, packed, s_w = bitlinear_and_packed(8, 50, packing)
    y = ternary_linear(x, packed, s_w, packing, 8, 50)
    assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[0] != 0).any()


def test_bad_arguments_raise_clearly():
    packed = pack_ternary(random_ternary(4, 10), "i2")
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="x must be float32"):
        ternary_linear(torch.ones(1, 10, dtype=torch.int32), packed, s, "i2", 4, 10)
    with pytest.raises(ValueError, match="expected \\[..., 10\\]"):
        ternary_linear(torch.ones(1, 11), packed, s, "i2", 4, 10)
    with pytest.raises(ValueError, match="packed must be uint8"):
        ternary_linear(torch.ones(1, 10), packed, s, "tq1", 4, 10)
    with pytest.raises(ValueError, match="unknown packing"):
        ternary_linear(torch.ones(1, 10), packed, s, "q4", 4, 10)
