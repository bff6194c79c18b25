"""The conversion study end to end at a tiny scale (hgf.reproduce.convert_study): the FP model,
every arm at two ranks and two seeds, and the report with gap recovery, overhead and curves."""

from __future__ import annotations

import json
import math

import pytest

from hgf.commands.reproduce import is_conversion_study
from hgf.reproduce.convert_study import KINDS, against_reference, load_study, main, plan_arms
from trainkit import ROOT, VOCAB

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _preset(path, dataset) -> str:
    data, cache = dataset
    path.write_text(f"""
[study]
fp_steps = 8
ft_steps = 4
seeds = 2
overhead = 0.15
large_rank = 4

[base.model]
vocab_size = {VOCAB}
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 64
max_seq_len = 32

[base.data]
path = "{data}"
cache_dir = "{cache}"

[base.train]
batch_size = 4
seq_len = 16
log_every = 1
warmup_steps = 1
progress = false

[base.eval]
every = 2
batches = 2

[fp.train]
lr = 3e-3

[ft.train]
lr = 1e-3

[distill]
alpha = 0.5
temperature = 2.0
""")
    return str(path)


def test_the_study_runs_end_to_end_and_reports(tmp_path, dataset, capsys):
    preset, out = _preset(tmp_path / "tiny.toml", dataset), tmp_path / "out"
    assert main(["--preset", preset, "--out", str(out)]) == 0
    study = load_study(preset)
    plan = plan_arms(study, out)
    arms = {a for _, a, _, _ in plan}
    assert arms == {"ptq", "hgf_svd_ptq_r1", "hgf_svd_ptq_r4", "fp_ft", "qat", "qat_kd", "hgf_svd_kd_r1",
                    "hgf_svd_kd_r4", "hgf_lora_kd_r1", "hgf_lora_kd_r4", "tequila_kd", "sherry_kd",
                    "ptqtp", "scratch"}
    res = json.loads((out / "tiny.json").read_text())
    rows = res["rows"]
    assert set(rows) == arms | {"fp"}
    for name, r in rows.items():
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["val_bpb"]), name
        assert r["n"] == (1 if name == "fp" or "ptq" in name else 2), name
    assert rows["scratch"]["steps"] == 12 and rows["qat"]["steps"] == 4
    # at d_model 32 even rank 1 costs ~40% of the backbone: the overhead-bound rank is its floor 1
    r1, r4 = rows["hgf_svd_kd_r1"]["memory"], rows["hgf_svd_kd_r4"]["memory"]
    assert (r1["rank"], r4["rank"]) == (1, 4) and r4["overhead_i2"] > r1["overhead_i2"] > 0
    fp, ptq = rows["fp"]["val_loss"], rows["ptq"]["val_loss"]
    want = (ptq - rows["hgf_svd_ptq_r4"]["val_loss"]) / (ptq - fp)
    assert rows["hgf_svd_ptq_r4"]["gap_recovery"] == pytest.approx(want)
    # the equal-token control: the untrained arms and fp_ft itself are measured against the
    # source, the trained ones (fine-tuned, scratch) against fp_ft
    assert rows["fp_ft"]["bits_i2"] == 16 and rows["fp_ft"]["steps"] == 4  # dense, fine-tuned
    for name, want_fp in (("ptq", "fp"), ("ptqtp", "fp"), ("fp_ft", "fp"), ("qat_kd", "fp_ft"),
                          ("hgf_svd_kd_r4", "fp_ft"), ("scratch", "fp_ft")):
        r, base = rows[name], rows[want_fp]
        assert r["fp_reference"] == want_fp, name
        assert r["gap_to_fp"] == pytest.approx(r["val_loss"] - base["val_loss"]), name
    for name, ref in (("hgf_svd_kd_r4", "qat_kd"), ("tequila_kd", "qat_kd"),
                      ("sherry_kd", "qat_kd"), ("ptqtp", "ptq")):
        r, base = rows[name], rows[ref]
        fp_row = rows[r["fp_reference"]]
        assert r["reference"] == ref
        assert r["vs_reference"] == pytest.approx(base["val_loss"] - r["val_loss"])
        den = base["val_loss"] - fp_row["val_loss"]
        if den > 2 * math.hypot(_se(base), _se(fp_row)):  # a gap to recover: the ratio
            assert r["gap_recovery"] == pytest.approx((base["val_loss"] - r["val_loss"]) / den)
        else:  # none beyond the noise: no ratio, a note
            assert math.isnan(r["gap_recovery"]) and r["gap_note"].startswith("no gap")
    # PTQTP's two planes beat one absmean plane on the weights, so on the loss without training
    assert rows["ptqtp"]["val_loss"] < ptq
    bits = {name: rows[name]["bits_i2"] for name in ("fp", "qat", "sherry_kd", "ptqtp", "tequila_kd")}
    assert bits["fp"] == 16 and bits["sherry_kd"] < bits["qat"] < bits["tequila_kd"] < bits["ptqtp"]
    report = (out / "tiny.md").read_text()
    for name in arms:
        assert f"| {name} |" in report
    assert "## What it shows" in report and "Does the correction pay here?" in report
    assert "The FP model continued on the fine-tune's tokens" in report
    assert (out / "tiny_curves.png").is_file()

    # a second call skips every finished run; --report-only rebuilds the report
    capsys.readouterr()
    assert main(["--preset", preset, "--out", str(out), "--arms", "qat"]) == 0
    assert "done already" in capsys.readouterr().out
    (out / "tiny.md").unlink()
    assert main(["--preset", preset, "--out", str(out), "--report-only"]) == 0
    assert (out / "tiny.md").read_text() == report


def test_presets_load_and_bad_ones_fail(tmp_path, capsys):
    for path in (ROOT / "configs" / "reproduce").glob("*.toml"):
        if is_conversion_study(str(path)):  # [study] and no [grid] (the why presets have both)
            study = load_study(str(path))
            assert set(study.kinds) <= set(KINDS) and study.seeds > 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[study]\narms = ['nope']\n")
    assert main(["--preset", str(bad), "--report-only"]) == 2
    assert "unknown arm 'nope'" in capsys.readouterr().err


def test_seed_index_runs_one_seed(tmp_path, dataset, capsys):
    """--seed-index K: one process per seed; the no-training arms belong to seed 0."""
    preset, out = _preset(tmp_path / "tiny.toml", dataset), tmp_path / "out"
    study = load_study(preset)
    seed1 = plan_arms(study, out, ["ptq", "qat", "scratch"], seed_index=1)
    assert seed1 == [("qat", "qat", 1, None), ("scratch", "scratch", 1, None)]
    assert [r[:3] for r in plan_arms(study, out, ["ptq", "qat"], seed_index=0)] == [
        ("ptq", "ptq", 0), ("qat", "qat", 0)]
    assert main(["--preset", preset, "--out", str(out), "--arms", "qat", "--seed-index", "1"]) == 0
    assert (out / "tiny" / "qat-seed1" / "done.json").is_file()
    assert not (out / "tiny" / "qat-seed0").exists()
    # past the preset's seeds: an extra seed, as for a grid
    assert plan_arms(study, out, ["qat"], seed_index=2) == [("qat", "qat", 2, None)]
    assert main(["--preset", preset, "--out", str(out), "--seed-index", "-1", "--report-only"]) == 2
    assert "--seed-index must be >= 0, got -1" in capsys.readouterr().err
    # a checkout with the FP model's records but not its weights (git keeps no weights): finished
    # arms are skipped, a new one stops with one line instead of failing inside its run
    (out / "tiny" / "fp" / "model.safetensors").unlink()
    assert main(["--preset", preset, "--out", str(out), "--arms", "qat", "--seed-index", "1"]) == 0
    capsys.readouterr()
    assert main(["--preset", preset, "--out", str(out), "--arms", "fp_ft", "--seed-index", "0"]) == 2
    err = capsys.readouterr().err
    assert "the FP model is finished (done.json) but its weights" in err and "fp_ft needs" in err
    assert not (out / "tiny" / "fp_ft-seed0").exists()


def _se(row):
    return row["val_loss_std"] / math.sqrt(row["n"]) if row["n"] > 1 else 0.0


def _row(arm, loss, std=0.0, n=1):
    return {"arm": arm, "val_loss": loss, "val_loss_std": std, "n": n}


def test_gap_recovery_needs_a_gap_beyond_the_noise():
    """The ratio (L_ref - L_arm) / (L_ref - L_fp) only where the reference is above the FP model
    by more than twice its standard error; the difference from the reference always, with its
    standard error."""
    fp = _row("fp", 2.0)
    arm = _row("hgf", 2.1, 0.02, 2)
    against_reference(arm, _row("qat_kd", 2.3, 0.02, 2), fp)  # gap 0.3, SE 0.014
    assert arm["vs_reference"] == pytest.approx(0.2)
    assert arm["vs_reference_se"] == pytest.approx(math.hypot(0.02, 0.02) / math.sqrt(2))
    assert arm["gap_recovery"] == pytest.approx(0.2 / 0.3) and arm["gap_note"] == ""
    against_reference(arm, _row("qat_kd", 2.02, 0.02, 2), fp)  # gap 0.02 < 2 SE (0.028)
    assert math.isnan(arm["gap_recovery"])
    assert arm["gap_note"] == "no gap: qat_kd is within 2 SE of the FP model"
    assert arm["vs_reference"] == pytest.approx(-0.08)
    against_reference(arm, _row("qat_kd", 1.99, 0.0, 2), fp)  # below the FP model
    assert math.isnan(arm["gap_recovery"]) and "below" in arm["gap_note"]
    against_reference(arm, None, fp)  # an arm without a reference
    assert arm["reference"] is None and math.isnan(arm["vs_reference"])
    # against the equal-token control, whose own seed noise widens the gap's uncertainty:
    # gap 0.04 > 2 SE of qat_kd alone (0.028), < 2 · hypot(0.014, 0.014) (0.040)
    control = _row("fp_ft", 1.98, 0.02, 2)
    against_reference(arm, _row("qat_kd", 2.0199, 0.02, 2), control)
    assert math.isnan(arm["gap_recovery"])
    assert arm["gap_note"] == ("no gap: qat_kd is within 2 SE of the FP model continued on the "
                               "same tokens")
    against_reference(arm, _row("qat_kd", 2.2, 0.02, 2), control)  # gap 0.22: a ratio
    assert arm["gap_recovery"] == pytest.approx(0.1 / 0.22) and arm["gap_note"] == ""
