"""hgf reproduce on a micro grid written by the test: runs, skips finished runs, reports."""

import json
import math

import pytest

from hgf.cli import main
from hgf.reproduce.grid import load_preset, plan_grid, plan_variants
from hgf.reproduce.report import gap_recovery, steps_to_reach

STORY = "Once upon a time there was a little {} who liked to {}. One day it {} and was happy."


def _dataset(tmp_path):
    d = tmp_path / "stories"
    d.mkdir()
    words = [("cat", "run", "jumped"), ("dog", "swim", "sang"), ("bird", "fly", "laughed"),
             ("fox", "read", "slept")]
    for split, n in (("train", 120), ("valid", 24)):
        stories = [STORY.format(*words[i % 4]) for i in range(n)]
        (d / f"{split}.txt").write_text("".join(s + "\n<|endoftext|>\n" for s in stories))
    return d


def _preset(tmp_path, arms=("fp16", "bitnet", "hgf")):
    p = tmp_path / "micro.toml"
    p.write_text(f"""
[grid]
arms = {list(arms)!r}
steps = [4, 6]
seeds = 1
[base.model]
vocab_size = 300
[base.data]
path = "{_dataset(tmp_path).as_posix()}"
cache_dir = "{(tmp_path / 'cache').as_posix()}"
[base.train]
batch_size = 2
seq_len = 16
warmup_steps = 1
log_every = 1
ckpt_every = 2
progress = false
threads = 1
[base.eval]
every = 2
batches = 1
""")
    return p


def test_gap_recovery_formula():
    assert gap_recovery(1.0294, 0.9306, 0.8490) == pytest.approx(0.548, abs=1e-3)
    assert math.isnan(gap_recovery(1.0, 0.9, 1.0))
    assert steps_to_reach([(10, 3.0), (20, 2.0), (30, 1.5)], 2.0) == 20
    assert steps_to_reach([(10, 3.0)], 2.0) is None


def test_micro_grid_runs_reports_and_skips_finished(tmp_path, capsys):
    preset = _preset(tmp_path)
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "results.csv", "val_loss_4.png", "val_loss_6.png",
                 "gates.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"4", "6"}
    rows = res["table"]["6"]
    assert set(rows) == {"fp16", "bitnet", "hgf"}
    expected = (rows["bitnet"]["val_loss"] - rows["hgf"]["val_loss"]) / (
        rows["bitnet"]["val_loss"] - rows["fp16"]["val_loss"])
    assert res["gap_recovery"]["6"]["bitnet"] == pytest.approx(expected)
    assert res["memory"]["i2"]["overhead"] > 0
    assert 0 < res["steps_to_bitnet_final_loss"]["6"]["bitnet"] <= 6  # reaches its own last eval
    assert sum(res["commits"].values()) == 6  # each run's code version, from its run_info.json
    report = (out / "report.md").read_text()
    assert "Gap recovery" in report and "What reproduced" in report and "0.9306" in report
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 6

    # A second invocation skips every finished run.
    done = out / "runs" / "hgf-6steps-seed0" / "done.json"
    mtime = done.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reproduce", "--preset", str(preset), "--out", str(out)]) == 0
    assert "done already" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == mtime


def test_interrupted_run_resumes_from_checkpoint(tmp_path):
    preset_path = _preset(tmp_path, arms=("hgf",))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset_path), "--out", str(out), "--steps", "6"]) == 0
    run = out / "runs" / "hgf-6steps-seed0"
    first = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    (run / "done.json").unlink()  # as if killed after its last checkpoint
    assert main(["reproduce", "--preset", str(preset_path), "--out", str(out), "--steps", "6"]) == 0
    assert (run / "done.json").is_file()
    again = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert [r["loss"] for r in again] == [r["loss"] for r in first]


def test_bad_preset_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\narms = ["fp16", "nonsense"]\n')
    assert main(["reproduce", "--preset", str(bad)]) == 2
    assert "unknown arm 'nonsense'" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "no-such-preset"]) == 2
    assert "unknown reproduce preset" in capsys.readouterr().err


def test_plan_grid_applies_preset_layers(tmp_path):
    preset = load_preset(str(_preset(tmp_path)))
    specs = plan_grid(preset, tmp_path / "o")
    hgf = next(s for s in specs if s.arm == "hgf" and s.steps == 6)
    assert hgf.cfg.model.linear == "hgf" and hgf.cfg.model.attention == "differential"
    assert hgf.cfg.train.steps == 6 and hgf.cfg.model.vocab_size == 300
    assert hgf.dir == tmp_path / "o" / "runs" / "hgf-6steps-seed0"


def test_command_line_overrides_and_one_seed_index(tmp_path, capsys):
    """``--section.key=value`` lands over every layer of every run (a variant's too);
    ``--seed-index`` runs one seed of the grid, named as the full grid names it."""
    p = _preset(tmp_path, arms=("bitnet",))
    p.write_text(p.read_text() + '[variant.lr_hi]\narm = "bitnet"\ntrain = { lr = 0.01 }\n')
    preset = load_preset(str(p), {"train": {"lr": "0.005", "dtype": "bfloat16"}})
    specs = plan_grid(preset, tmp_path / "o", seeds=3, only_seed=2)
    assert [(s.steps, s.seed_index) for s in specs] == [(4, 2), (6, 2)]
    assert specs[0].dir == tmp_path / "o" / "runs" / "bitnet-4steps-seed2"
    assert specs[0].cfg.train.lr == 0.005 and specs[0].cfg.train.dtype == "bfloat16"
    full = plan_grid(preset, tmp_path / "o", seeds=3)
    assert (full[2].steps, full[2].seed_index) == (4, 2)
    assert specs[0].cfg.train.seed == full[2].cfg.train.seed != full[0].cfg.train.seed
    v = plan_variants(preset, tmp_path / "o", ["lr_hi"], [4], only_seed=1)
    assert len(v) == 1 and v[0].cfg.train.lr == 0.005 and v[0].seed_index == 1
    out = tmp_path / "o"
    assert main(["reproduce", "--preset", str(p), "--out", str(out), "--steps", "4", "--seeds",
                 "2", "--seed-index", "1", "--train.dtype=float32"]) == 0
    assert (out / "runs" / "bitnet-4steps-seed1" / "done.json").exists()
    assert not (out / "runs" / "bitnet-4steps-seed0").exists()
    cfg = json.loads((out / "runs" / "bitnet-4steps-seed1" / "config.json").read_text())
    assert cfg["train"]["dtype"] == "float32"
    capsys.readouterr()
    assert main(["reproduce", "--preset", str(p), "--out", str(out), "--train.nosuch=1"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["reproduce", "--preset", str(p), "--seeds-typo", "1"]) == 2
    assert "--seeds-typo" in capsys.readouterr().err
    assert main(["reproduce", "--preset", str(p), "--report-only", "--train.steps=abc"]) == 2
    assert "--train.steps is set by the grid for each run: use --steps" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_preset_on_real_data(tmp_path, monkeypatch):
    from pathlib import Path

    shared = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinystories"
    if not (shared / "train.txt").is_file():
        pytest.skip("../shared/data/tinystories is not present")
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--preset", "smoke", "--out", "out"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    smoke = load_preset("smoke")
    assert len(res["runs"]) == len(smoke.arms) * len(smoke.steps) * smoke.seeds == 16
    assert all(math.isfinite(r["val_loss"]) for r in res["runs"])


def test_lr_sweep_picks_the_best_lr_and_accumulates(tmp_path):
    preset = _preset(tmp_path, arms=("fp16",))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--sweep",
                 "--lrs", "0.001,0.01", "--sweep-steps", "4"]) == 0
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--sweep",
                 "--lrs", "0.003", "--sweep-steps", "4"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(lr for _, lr, _, _ in sweep["runs"]) == [0.001, 0.003, 0.01]
    best = min((v, lr) for _, lr, v, _ in sweep["runs"])
    assert sweep["best"]["fp16"]["lr"] == best[1]
    assert "Chosen: fp16" in (out / "sweep.md").read_text()


def test_variants_compare_with_the_grid_and_extra_seeds_join_the_report(tmp_path):
    preset = _preset(tmp_path)
    with preset.open("a") as f:
        f.write('[variant.fast_ab]\narm = "hgf"\nabout = "A/B LR x10"\nhgf = { lr_mult = 10.0 }\n'
                '[variant.wide]\narm = "hgf"\nabout = "rank 4"\nhgf = { rank = 4 }\n')
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4"]) == 0
    # an extra seed of one arm, run alone, joins the whole grid's report (mean ± std)
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--arms", "bitnet", "--seeds", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["table"]["4"]["bitnet"]["n"] == 2 and res["table"]["4"]["fp16"]["n"] == 1
    assert "6 steps" in " ".join(res["missing"])  # the un-run regime is still reported missing

    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--variants", "fast_ab"]) == 0
    run = out / "variants" / "fast_ab-4steps-seed0"
    assert json.loads((run / "done.json").read_text())["variant"] == "fast_ab"
    assert json.loads((run / "config.json").read_text())["hgf"]["lr_mult"] == 10.0
    # a second variant run alone keeps the first in the report
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--variants", "wide"]) == 0
    v = json.loads((out / "variants.json").read_text())["regimes"]["4"]
    assert set(v["variants"]) == {"fast_ab", "wide"}
    ref = v["reference"]
    assert ref["bitnet"]["n"] == 2 and set(ref) == {"fp16", "bitnet", "hgf"}
    row = v["variants"]["fast_ab"]
    assert row["delta_vs_arm"] == pytest.approx(row["val_loss"] - ref["hgf"]["val_loss"])
    assert row["gap_recovery_vs_bitnet"] == pytest.approx(
        gap_recovery(ref["bitnet"]["val_loss"], row["val_loss"], ref["fp16"]["val_loss"]))
    assert v["variants"]["wide"]["overhead_i2"] > 0
    md = (out / "variants.md").read_text()
    assert "| fast_ab | hgf | A/B LR x10 | 1 |" in md and (out / "variants_4.png").is_file()
    assert (out / "variants_final_4.png").is_file()


def test_report_only_of_a_variants_only_preset_writes_no_grid_report(tmp_path, capsys):
    """A preset run only through its variants (why_lr): --report-only does not write a grid
    report that lists every grid run as unfinished; the variants' report still rebuilds."""
    preset = _preset(tmp_path)
    with preset.open("a") as f:
        f.write('[variant.fast_ab]\narm = "hgf"\nabout = "A/B LR x10"\nhgf = { lr_mult = 10.0 }\n')
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--variants", "fast_ab"]) == 0
    capsys.readouterr()
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--report-only"]) == 0
    assert "report: none (no run of the preset's grid" in capsys.readouterr().out
    assert not (out / "report.md").exists() and not (out / "results.json").exists()
    (out / "variants.md").unlink()
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--variants", "all", "--report-only"]) == 0
    md = (out / "variants.md").read_text()
    assert "| fast_ab | hgf |" in md
    # the regimes measured (4 steps) are not all of the preset's (4, 6): the rebuild command says so
    assert "Command: `hgf reproduce --preset" in md and "--variants all --steps 4`" in md
    # with one grid run finished the grid report is written (and lists the rest as unfinished)
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--arms", "bitnet"]) == 0
    assert "Incomplete grid" in (out / "report.md").read_text()


def test_bad_variant_errors(tmp_path, capsys):
    preset = _preset(tmp_path)
    with preset.open("a") as f:
        f.write('[variant.x]\nabout = "no arm"\n')
    assert main(["reproduce", "--preset", str(preset)]) == 2
    assert "[variant.x]: needs arm" in capsys.readouterr().err
    preset = _preset(tmp_path / "b" if (tmp_path / "b").mkdir() is None else tmp_path)
    assert main(["reproduce", "--preset", str(preset), "--variants", "nope", "--out",
                 str(tmp_path / "o")]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err


def test_seed_noise_statement():
    from hgf.reproduce.report import seed_noise

    one = {"n": 1, "val_loss": 3.0, "val_loss_std": 0.0}
    assert "not measured" in seed_noise(one, one)[0]
    a = {"n": 3, "val_loss": 3.60, "val_loss_std": 0.01}
    b = {"n": 3, "val_loss": 3.56, "val_loss_std": 0.01}
    assert "+0.0400" in seed_noise(a, b)[0] and "larger than" in seed_noise(a, b)[0]
    b["val_loss"] = 3.59
    assert "within" in seed_noise(a, b)[0]  # 0.01 < 2 * sqrt(2 * 0.01² / 3) = 0.0163


def test_a_grid_skips_the_runs_another_process_is_training(tmp_path, capsys):
    """Several processes can work through one grid: a run whose folder is locked is skipped
    (no done.json), the others run, and the summary says so."""
    from hgf.runs import run_lock

    preset = _preset(tmp_path, arms=("fp16", "bitnet"))
    out = tmp_path / "out"
    with run_lock(out / "runs" / "fp16-4steps-seed0"):
        assert main(["reproduce", "--preset", str(preset), "--out", str(out),
                     "--steps", "4"]) == 0
    cap = capsys.readouterr().out
    assert "run 1/2 fp16@4: skipped, " in cap and "another process is training this run" in cap
    assert "1 of 2 runs done (1 run now, 0 done already, 1 skipped: in use by another process)" \
        in cap
    assert not (out / "runs" / "fp16-4steps-seed0" / "done.json").exists()
    assert (out / "runs" / "bitnet-4steps-seed0" / "done.json").is_file()
