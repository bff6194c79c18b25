import math

import pytest

from hgf.config import load_config
from hgf.memory import memory_report, packed_bytes, rank_for_overhead, report_for_config
from hgf.model import build_model

SMALL = ["--model.d_model=16", "--model.n_heads=2", "--model.d_ff=24", "--model.n_layers=2",
         "--model.vocab_size=50", "--hgf.rank=3", "--train.seq_len=16"]


def test_packed_bytes_by_hand():
    assert packed_bytes(3, 10, "i2") == 3 * 3  # ceil(10/4)=3 bytes per row
    assert packed_bytes(3, 10, "tq1") == 3 * 2  # ceil(10/5)=2
    assert packed_bytes(2, 8, "entropy") == pytest.approx(16 * math.log2(3) / 8)
    with pytest.raises(ValueError):
        packed_bytes(1, 1, "fp4")


def test_memory_report_equals_hand_computation():
    rep = report_for_config(load_config("configs/hgf.toml", SMALL))
    d, ff, L, r, V = 16, 24, 2, 3, 50
    ternary = L * (4 * d * d + 3 * d * ff)
    assert rep.ternary_params == ternary
    assert len(rep.ternary_shapes) == 7 * L
    correction = L * r * (4 * (d + d) + 2 * (d + ff) + (ff + d))
    assert rep.correction_params == correction
    assert rep.n_gates == 7 * L
    assert rep.embedding_params == V * d and rep.head_params == V * d
    # i2: every row packs ceil(in/4) bytes; + 4-byte scale per tensor
    i2 = L * (4 * d * math.ceil(d / 4) + 2 * ff * math.ceil(d / 4) + d * math.ceil(ff / 4)) + 4 * 7 * L
    assert rep.backbone_bytes("i2") == i2
    tq1 = L * (4 * d * math.ceil(d / 5) + 2 * ff * math.ceil(d / 5) + d * math.ceil(ff / 5)) + 4 * 7 * L
    assert rep.backbone_bytes("tq1") == tq1
    corr_bytes = 2 * (correction + 7 * L)
    assert rep.correction_bytes == corr_bytes
    assert rep.overhead("i2") == pytest.approx(corr_bytes / i2)
    assert rep.overhead("i2", with_embeddings=True) == pytest.approx(corr_bytes / (i2 + 2 * 2 * V * d))
    # norms: 2 per block + SubLN (d and ff) per block + final; λ: 4 vectors of head_dim per layer
    other = L * (2 * d + d + ff) + d + L * (4 * (d // 2) + 2 * (d // 2))
    assert rep.other_params == other
    assert rep.total_params == sum(p.numel() for p in build_model(
        load_config("configs/hgf.toml", SMALL)).parameters())


def test_dense_arm_has_no_overhead_and_tied_head_counts_once():
    rep = report_for_config(load_config("configs/fp16.toml", SMALL + ["--model.tie_embeddings=true"]))
    assert rep.ternary_params == 0 and rep.overhead("i2") is None
    assert rep.head_params == 0 and rep.dense_params == 2 * (4 * 16 * 16 + 3 * 16 * 24)


def test_method_md_examples():
    base = ["--model.d_model=512", "--model.d_ff=1536", "--model.n_heads=8", "--model.n_layers=6"]
    rep8 = report_for_config(load_config("configs/hgf.toml", base + ["--hgf.rank=8"]))
    assert rep8.overhead("i2") == pytest.approx(0.192, abs=0.002)  # METHOD §5: ≈ 19%
    rep12 = report_for_config(load_config(
        "configs/hgf.toml", base + ["--hgf.rank=12", "--hgf.targets=attention"]))
    assert rep12.overhead("i2") == pytest.approx(0.115, abs=0.002)  # ≈ 11.5%


@pytest.mark.parametrize("target,targets", [(0.115, "attention"), (0.15, "all"), (0.05, "mlp")])
def test_rank_for_overhead_meets_target(target, targets):
    base = ["--model.d_model=512", "--model.d_ff=1536", "--model.n_heads=8", "--model.n_layers=6",
            f"--hgf.targets={targets}"]
    cfg = load_config("configs/hgf.toml", base)
    r = rank_for_overhead(cfg, target)
    at = report_for_config(load_config("configs/hgf.toml", base + [f"--hgf.rank={r}"]))
    above = report_for_config(load_config("configs/hgf.toml", base + [f"--hgf.rank={r + 1}"]))
    assert at.overhead("i2") <= target < above.overhead("i2")
    derived = build_model(load_config("configs/hgf.toml", base + [f"--hgf.target_overhead={target}"]),
                          device="meta")
    assert derived.rank == r


def test_memory_report_of_meta_model_allocates_nothing():
    model = build_model(load_config("configs/hgf.toml", ["--model.size=paper"]), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert memory_report(model).total_params > 20_000_000
