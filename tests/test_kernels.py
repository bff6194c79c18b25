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


# ---------------------------------------------------------------- CPU C++ kernel
def have_compiler() -> bool:
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    return bool(shutil.which("c++") or shutil.which("g++")) and is_ninja_available()


@pytest.fixture(scope="module")
def cpu_kernel():
    if not have_compiler():
        pytest.skip("no C++ compiler / ninja: the CPU kernel falls back to the reference")
    from hgf.kernels import cpu

    assert cpu.load(), "a compiler exists but the CPU kernel did not build"
    yield cpu
    cpu.isa("avx512-vnni")  # restore the best ISA the machine has


def test_cpu_kernel_is_built_and_dispatched(cpu_kernel):
    from hgf.kernels.ops import kernel_for

    assert kernel_for(torch.zeros(1, 8), 8) == "cpu"
    assert cpu_kernel.isa() in cpu_kernel.ISAS


@pytest.mark.parametrize("isa", ["avx512-vnni", "avx2", "portable"])
@pytest.mark.parametrize("packing", PACKINGS)
def test_cpu_kernel_matches_reference_exactly(cpu_kernel, isa, packing):
    cpu_kernel.isa(isa)  # capped at what this CPU has
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 4096, 256), (3, 7, 1), (2, 37, 700), (5, 130, 1000), (1, 9, 321), (17, 64, 64)]
    for m, in_f, out_f in shapes:
        w = random_ternary(out_f, in_f, gen)
        packed, s_w = pack_ternary(w, packing), torch.rand(()) + 0.1
        x = torch.randn(m, in_f, generator=gen) * 3
        for dtype in (torch.float32, torch.bfloat16):
            got = torch.ops.hgf.ternary_linear_cpu(x.to(dtype), packed, s_w, packing, out_f, in_f,
                                                   1e-5)
            want = ternary_linear_reference(x.to(dtype), packed, s_w, packing, out_f, in_f)
            assert got.dtype == dtype and torch.equal(got, want), (isa, m, in_f, out_f, dtype)


@pytest.mark.parametrize("packing", PACKINGS)
def test_cpu_kernel_avx2_every_code_and_tail(cpu_kernel, packing):
    # rows_avx2: every byte code (i2: all 256, the unused field value 3 decoding as code 3 in
    # kernel and reference alike; tq1: 0..242) both in full 64-byte groups and in the
    # zero-padded tail group, row blocks of 4 and single rows, activations at +-127
    if cpu_kernel.isa("avx2") != "avx2":
        pytest.skip("this CPU has no AVX2")
    codes, per = {"i2": (256, 4), "tq1": (243, 5)}[packing]
    try:
        gen = torch.Generator().manual_seed(3)
        for nbytes in (1, 31, 32, 33, 63, 64, 65, 95, 128, 129, 300):
            out_f, full = 9, nbytes - nbytes % 64
            packed = torch.empty(out_f, nbytes, dtype=torch.uint8)
            packed[:, :full] = (torch.arange(out_f * full) % codes).view(out_f, full)
            packed[:, full:] = (torch.arange(out_f * (nbytes - full)) % codes).view(out_f, -1)
            if nbytes == 95:  # 1 full group + 31 bytes: 9 x 64 and 9 x 31 bytes hold every code
                assert len(packed[:, :64].unique()) == len(packed[:, 64:].unique()) == codes
            for in_f in (per * nbytes, per * nbytes - per + 1):
                x = torch.randn(4, in_f, generator=gen) * 3
                x[1] = 1.0  # x_int = 127 everywhere
                x[2, 1::2] = -x[2, ::2].abs().max()  # x_int = -127 at odd indices
                x[3, 5:] *= 1e-3  # a few large values, the rest rounds to small or 0
                s_w = torch.tensor(0.7)
                got = torch.ops.hgf.ternary_linear_cpu(x, packed, s_w, packing, out_f, in_f, 1e-5)
                want = ternary_linear_reference(x, packed, s_w, packing, out_f, in_f)
                assert torch.equal(got, want), (nbytes, in_f)
    finally:
        cpu_kernel.isa("avx512-vnni")


@pytest.mark.parametrize("packing", PACKINGS)
def test_cpu_kernel_zero_token_and_3d_input(cpu_kernel, packing):
    bl, packed, s_w = bitlinear_and_packed(33, 130, packing)
    x = torch.randn(2, 4, 130)
    x[1, 2] = 0
    y = torch.ops.hgf.ternary_linear_cpu(x, packed, s_w, packing, 33, 130, 1e-5)
    assert y.shape == (2, 4, 33) and torch.isfinite(y).all() and (y[1, 2] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(y, bl(x), rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_cpu_kernel_fake_shape(cpu_kernel):
    packed = pack_ternary(random_ternary(6, 20), "tq1")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(2, 3, 20))
        y = torch.ops.hgf.ternary_linear_cpu(x, mode.from_tensor(packed),
                                             mode.from_tensor(torch.tensor(1.0)), "tq1", 6, 20,
                                             1e-5)
    assert y.shape == (2, 3, 6)


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as ext

    from hgf.kernels import cpu
    from hgf.kernels.ops import kernel_for

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(ext, "load", broken)
    cpu.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="simulated compiler failure"):
            assert kernel_for(torch.zeros(1, 8), 8) == "reference"
        assert kernel_for(torch.zeros(1, 8), 8) == "reference"  # no second build attempt
        _, packed, s_w = bitlinear_and_packed(5, 8, "i2")
        x = torch.randn(2, 8)
        torch.testing.assert_close(ternary_linear(x, packed, s_w, "i2", 5, 8),
                                   ternary_linear_reference(x, packed, s_w, "i2", 5, 8))
    finally:
        cpu.load.cache_clear()


# ---------------------------------------------------------------- Triton (interpreter on CPU)
# TRITON_INTERPRET must be set before triton is first imported, so these run in a subprocess.
INTERPRETED_CHECK = """
import torch
from hgf.kernels import pack_ternary, ternary_linear_reference
from hgf.kernels import triton_kernels as tk
assert tk.INTERPRET
gen = torch.Generator().manual_seed(2)
# GEMV (m <= GEMV_MAX_TOKENS) and GEMM (tl.dot) paths; tails: in % 64-byte group != 0
cases = [(1, 300, 40, torch.float32), (3, 700, 37, torch.bfloat16), (2, 1, 5, torch.float32),
         (tk.GEMV_MAX_TOKENS + 3, 257, 70, torch.float32), (40, 130, 33, torch.bfloat16)]
for packing in ("i2", "tq1"):
    for m, in_f, out_f, dtype in cases:
        w = torch.randint(-1, 2, (out_f, in_f), generator=gen)
        packed, s_w = pack_ternary(w, packing), torch.rand(()) + 0.1
        x = (torch.randn(m, in_f, generator=gen) * 2).to(dtype)
        x[0] = 0  # an all-zero token
        got = tk.ternary_linear_triton(x, packed, s_w, packing, out_f, in_f)
        want = ternary_linear_reference(x, packed, s_w, packing, out_f, in_f)
        assert got.dtype == dtype and torch.equal(got, want), (packing, m, in_f, out_f, dtype)
        assert (got[0] == 0).all()
print("INTERPRETED_OK")
"""


def test_triton_kernels_match_reference_interpreted():
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    import hgf

    src = str(Path(hgf.__file__).parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert "INTERPRETED_OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", PACKINGS)
def test_triton_on_gpu_matches_reference(packing):
    from hgf.kernels.ops import kernel_for

    x = torch.randn(1, 4096, device="cuda")
    assert kernel_for(x, 4096) == "triton"
    for m, in_f, out_f in [(1, 4096, 4096), (3, 1000, 333), (64, 2048, 700)]:
        w = random_ternary(out_f, in_f).cuda()
        packed, s_w = pack_ternary(w, packing), torch.tensor(0.7, device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, in_f, device="cuda").to(dtype)
            got = ternary_linear(x, packed, s_w, packing, out_f, in_f)
            want = ternary_linear_reference(x, packed, s_w, packing, out_f, in_f)
            assert torch.equal(got, want), (m, in_f, out_f, dtype)


def test_cpu_kernel_threads_and_fork(cpu_kernel):
    import multiprocessing as mp

    bl, packed, s_w = bitlinear_and_packed(512, 1000, "i2")
    x = torch.randn(3, 1000)
    want = ternary_linear_reference(x, packed, s_w, "i2", 512, 1000)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(ternary_linear(x, packed, s_w, "i2", 512, 1000), want)
    finally:
        torch.set_num_threads(threads)
    # a forked child (e.g. a DataLoader worker) has no pool threads: the kernel must not hang
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(ternary_linear, (x, packed, s_w, "i2", 512, 1000)).get(timeout=60)
    assert torch.equal(got, want)


def test_ternary_linear_traces_in_one_graph():
    # the dispatch (kernel availability) is a constant for torch.compile; the ops have fakes
    _, packed, s_w = bitlinear_and_packed(16, 40, "tq1")
    x = torch.randn(2, 3, 40)

    def f(x):
        return ternary_linear(x, packed, s_w, "tq1", 16, 40) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


def test_large_in_features_use_reference():
    from hgf.kernels.ops import kernel_for

    assert kernel_for(torch.zeros(1, 2**17 + 1), 2**17 + 1) == "reference"
    assert kernel_for(torch.zeros(1, 8, device="meta"), 8) == "reference"


def test_gemv_table_and_copy_bandwidth_run():
    from hgf.kernels.bench import copy_bandwidth, format_table, gemv_table, read_bandwidth

    rows = gemv_table(sizes=(64, 100), iters=2, rotate=False)
    assert [r["method"] for r in rows[:4]] == ["float32", "bfloat16", "ternary i2", "ternary tq1"]
    assert [r["weight_bytes"] for r in rows[:4]] == [64 * 64 * 4, 64 * 64 * 2, 64 * 16, 64 * 13]
    assert all(r["time_us"] > 0 and r["gb_s"] > 0 for r in rows)
    assert rows[4]["method"] == "ternary sherry" and rows[4]["weight_bytes"] == 64 * 10
    assert rows[2]["vs_i2"] == 1.0 and rows[4]["vs_i2"] > 0 and rows[0]["vs_i2"] is None
    assert rows[0]["speedup_vs_f32"] == 1.0 and rows[5]["n"] == 100
    bw = read_bandwidth(nbytes=1 << 20, iters=2)
    assert bw > 0 and copy_bandwidth(nbytes=1 << 20, iters=2) > 0
    assert "ternary i2" in format_table(rows, bw)


def test_gemv_table_forces_isas_and_restores(cpu_kernel):
    from hgf.kernels.bench import gemv_table

    avx2 = cpu_kernel.isa("avx2")  # capped at what this CPU has
    before = cpu_kernel.isa("avx512-vnni")
    rows = gemv_table(sizes=(70,), dtypes=("float32",), iters=2, rotate=False,
                      isas=("portable", "avx2"))
    assert [(r["method"], r["impl"]) for r in rows] == [
        ("float32", "torch"), ("ternary i2", "portable"), ("ternary tq1", "portable"),
        ("ternary i2", avx2), ("ternary tq1", avx2)]
    assert cpu_kernel.isa() == before


def test_stream_read_sums_bytes(cpu_kernel):
    t = torch.randint(0, 256, (100_003,), dtype=torch.uint8)
    assert torch.ops.hgf.stream_read(t) == int(t.sum())
