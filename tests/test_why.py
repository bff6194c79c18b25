"""The "why" study report (hgf.reproduce.why) from fake run folders written by the test, and the
dispatch of ``hgf reproduce --preset convert`` to the conversion study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hgf.cli import main
from hgf.reproduce.report import gap_recovery, gap_recovery_se
from hgf.reproduce.why import _best_lr_recovery, _stability, judge

ROOT = Path(__file__).resolve().parents[1]


def fake_run(run: Path, loss: float, *, arm: str, steps: int, seed: int = 0, lr: float = 2e-3,
             diverged: bool = False, variant: str | None = None) -> None:
    """The compact records of a finished run: done.json and metrics.jsonl (evals + final)."""
    run.mkdir(parents=True)
    done = {"status": "diverged" if diverged else "ok", "arm": arm, "steps": steps,
            "seed_index": seed, "lr": lr, "wall_s": 1.0} | ({"variant": variant} if variant else {})
    (run / "done.json").write_text(json.dumps(done))
    recs = [{"kind": "train", "step": s, "loss": loss + 1 - s / steps, "grad_norm": 0.5}
            for s in (steps // 2, steps)]
    recs += [{"kind": "eval", "step": s, "val_loss": loss + 0.5 - s / (2 * steps),
              "val_tokens": 1000} for s in (steps // 2, steps)]
    recs.append({"kind": "final", "step": steps, "val_loss": loss, "val_bpb": loss / 2.8,
                 "val_ppl": math.exp(loss), "val_tokens": 5000})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_gap_recovery_se_is_the_first_order_propagation():
    t, a, f = ({"val_loss": v, "val_loss_std": s, "n": 3}
               for v, s in ((3.6, 0.02), (3.5, 0.01), (3.2, 0.03)))
    se = gap_recovery_se(t, a, f)
    h, grads = 1e-6, []
    for row in (t, a, f):  # numerical partial derivatives of R
        row["val_loss"] += h
        up = gap_recovery(t["val_loss"], a["val_loss"], f["val_loss"])
        row["val_loss"] -= 2 * h
        down = gap_recovery(t["val_loss"], a["val_loss"], f["val_loss"])
        row["val_loss"] += h
        grads.append((up - down) / (2 * h) * row["val_loss_std"] / math.sqrt(3))
    assert se == pytest.approx(math.sqrt(sum(g * g for g in grads)), rel=1e-5)
    assert gap_recovery_se({**t, "n": 1}, a, f) is None  # one seed: the noise is unknown


def test_judge():
    assert judge(0.3, 0.05, 0.1) == "supported"
    assert judge(0.05, 0.01, 0.1) == "refuted"  # clearly positive but below the minimum effect
    assert judge(0.08, 0.05, 0.1) == "undecided at this budget"
    assert judge(-0.2, 0.05) == "refuted"
    assert judge(0.3, None) == "undecided at this budget"
    assert judge(math.nan, 0.1) == "not yet measured"


def test_stability_rule():
    def cell(arm, lr, k, n=2):
        return {"arm": arm, "lr": lr, "diverged": k, "n": n}

    c = {(f"{a}_{lr}", 2500): cell(a, lr, k) for a, lr, k in [
        ("bitnet", 4e-3, 0), ("hgf", 4e-3, 0), ("bitnet", 1.6e-2, 2), ("hgf", 1.6e-2, 0),
        ("diff_only", 1.6e-2, 1)]}
    v, text = _stability({}, c, 2500)
    assert v == "supported" and "LR 0.016: bitnet 2/2, diff_only 1/2, hgf 0/2" in text
    c[("hgf_0.016", 2500)] = cell("hgf", 1.6e-2, 2)
    assert _stability({}, c, 2500)[0] == "refuted"  # all run, hgf never more stable
    assert _stability({"_missing": ["x"]}, c, 2500)[0] == "undecided at this budget"
    assert _stability({}, {}, 2500)[0] == "not yet measured"


def test_best_lr_recovery_against_the_baseline_at_each_lr_with_its_standard_error():
    def cell(arm, lr, loss, std, n=2):
        return {"arm": arm, "lr": lr, "diverged": 0, "n": n, "val_loss": loss, "val_loss_std": std}

    c = {("fp16_a", 2500): cell("fp16", 4e-3, 3.30, 0.01), ("fp16_b", 2500): cell("fp16", 8e-3, 3.40, 0.01),
         ("bitnet_a", 2500): cell("bitnet", 4e-3, 3.50, 0.02),
         ("bitnet_b", 2500): cell("bitnet", 8e-3, 3.70, 0.02, n=1),
         ("hgf_a", 2500): cell("hgf", 4e-3, 3.55, 0.03), ("hgf_b", 2500): cell("hgf", 8e-3, 3.60, 0.01)}
    (line, _blank) = _best_lr_recovery(c, 2500, "bitnet")
    best_hgf, fp = c[("hgf_a", 2500)], c[("fp16_a", 2500)]  # each arm at its lowest loss
    q4 = gap_recovery(3.50, 3.55, 3.30)
    se4 = gap_recovery_se(c[("bitnet_a", 2500)], best_hgf, fp)
    q8 = gap_recovery(3.70, 3.55, 3.30)
    assert line == (f"- hgf at its best LR (0.004) recovers, against bitnet at each LR (fp16 at its "
                    f"best): LR 0.004: {q4:.3f} ± {se4:.3f}, LR 0.008: {q8:.3f} ± ?")
    assert q4 < 0 < q8  # the artefact: "recovery" only against a baseline past its best LR


def test_report_without_runs_says_what_to_run(study, capsys):
    assert main(["reproduce", "--preset", "why_tokens", "--report-only"]) == 0
    assert "study report: results/cpu/why.md" in capsys.readouterr().out
    md = (study / "results/cpu/why.md").read_text()
    for n in (1, 2, 3, 4):
        assert f"## Experiment {n}:" in md
    assert md.index("Experiment 3") < md.index("Experiment 4")
    assert md.count("not yet measured.**") == 5  # experiment 4 in two regimes
    assert "**Hypothesis.** The correction recovers nothing" in md  # text from the preset
    assert "    hgf reproduce --preset why_tokens --steps 8000 --seeds 2" in md
    assert "    hgf reproduce --preset why_lr --variants all --steps 2500 --seeds 2" in md
    assert "    hgf reproduce --preset why_width --variants gate_channel,gate_input --steps 2500 " \
        "--seeds 2" in md
    assert "    hgf reproduce --preset why_width --variants fp16_lr2e-3,fp16_lr1e-3,fp16_lr5e-4 " \
        "--steps 2500 --seeds 2" in md  # experiment 2's FP16 reference at other LRs
    assert "--out results/why_width/oracle_small.json" in md


def test_report_with_out_goes_to_that_folder(study, capsys):
    """--out ELSEWHERE on a study preset: the report is ELSEWHERE/why.md; the default report
    (results/cpu/why.md, built from the default folders) is not rewritten."""
    out = study / "elsewhere"
    fake_run(out / "runs" / "fp16-8000steps-seed0", 3.0, arm="fp16", steps=8000)
    assert main(["reproduce", "--preset", "why_tokens", "--report-only", "--out", str(out)]) == 0
    assert f"study report: {out / 'why.md'}" in capsys.readouterr().out
    assert "| fp16 | fp16 | 0.004 | 1 | 3.0000 |" in (out / "why.md").read_text()
    assert not (study / "results" / "cpu" / "why.md").exists()


def test_report_tables_recovery_and_verdicts(study):
    runs = study / "results" / "why_tokens" / "runs"
    losses = {"fp16": (3.00, 3.02), "bitnet": (3.40, 3.42), "hgf_std": (3.20, 3.21)}
    for arm, (l0, l1) in losses.items():
        for seed, loss in enumerate((l0, l1)):
            fake_run(runs / f"{arm}-8000steps-seed{seed}", loss, arm=arm, steps=8000, seed=seed)
        fake_run(runs / f"{arm}-2000steps-seed0", l0 + 0.5, arm=arm, steps=2000)
    # experiment 4: one seed of a variant and its arm: the noise is unknown, so undecided
    width = study / "results" / "why_width"
    fake_run(width / "runs" / "hgf_std-2500steps-seed0", 3.3, arm="hgf_std", steps=2500)
    fake_run(width / "variants" / "gate_channel-2500steps-seed0", 3.25, arm="hgf_std",
             steps=2500, variant="gate_channel")
    oracle = {"bitnet_run": "b", "fp16_run": "f", "d_model": 256, "bitnet_val_loss": 3.4,
              "fp16_val_loss": 3.0, "rows": [{"targets": "attention", "rank": 8, "steps": 10,
                                              "lr": 2e-3, "overhead_2bit": 0.15, "train_loss": 3.3,
                                              "val_loss": 3.3, "val_bpb": 1.2, "recovery": 0.25,
                                              "wall_s": 1}]}
    (width / "oracle_small.json").write_text(json.dumps(oracle))
    assert main(["reproduce", "--preset", "why_width", "--report-only"]) == 0
    md = (study / "results/cpu/why.md").read_text()
    exp1 = md[md.index("## Experiment 1"):md.index("## Experiment 2")]
    r = gap_recovery(3.41, 3.205, 3.01)
    se = gap_recovery_se(*({"val_loss": sum(v) / 2, "val_loss_std": abs(v[0] - v[1]) / math.sqrt(2),
                            "n": 2} for v in (losses["bitnet"], losses["hgf_std"], losses["fp16"])))
    assert f"| hgf_std | hgf_std | 0.002 | 2 | 3.2050 ± 0.0071 | {3.205 / 2.8:.4f} ± " in exp1
    assert f"{r:.3f} ± {se:.3f} |" in exp1
    assert "**Verdict (8000 steps): supported.**" in exp1
    assert "Not yet run (3 runs): fp16 2000 steps (seed 1)" in exp1  # 2000-step seeds 1 missing
    assert "![experiment 1](why_tokens.png)" in exp1
    assert (study / "results/cpu/why_tokens.png").is_file()
    exp2 = md[md.index("## Experiment 2"):md.index("## Experiment 3")]
    assert "| attention | 8 | 15.0% | 10 | 3.3000 | 1.2000 | +0.250 |" in exp2  # oracle table
    assert "oracle probe `results/why_width/oracle_tiny.json`" in exp2  # the other is not run
    exp4 = md[md.index("## Experiment 4"):]
    assert "| gate_channel | hgf_std | 0.002 | 1 | 3.2500 |" in exp4
    assert "undecided at this budget.** gate_channel: L_hgf_std − L_gate_channel = +0.0500 ± ?" \
        in exp4
    assert "Oracle probe" not in exp4  # the probe is experiment 2's, shown once
    assert (study / "results/cpu/why_width_4.png").is_file()
    summary = md[md.index("## Verdicts"):md.index("## Experiment 1")]  # one line per experiment
    assert ("- Experiment 1, Under-training (tokens per parameter): **supported** (8000 steps); "
            "3 runs not yet run") in summary
    assert "- Experiment 3, Stability, not capacity: **not yet measured** (2500 steps);" in summary
    assert summary.count("\n- Experiment ") == 5  # experiment 4 in two regimes
    exp4_tokens = md[md.index("## Experiment 4: The paper's future work in experiment 1"):
                     md.index("## Experiment 4: The paper's future work: a gate")]
    assert "### 2000 steps" not in exp4_tokens  # a variants experiment shows its own regime
    assert ("Not yet run (4 runs): gate_channel 8000 steps (seed 0, 1), gate_input 8000 steps "
            "(seed 0, 1)") in exp4_tokens  # expected at its regime only, not at 2000 steps


def test_gate_variants_run_through_hgf_reproduce(tmp_path):
    """The variants of experiment 4 run as any variant does (a micro preset, 3 steps)."""
    from test_reproduce import _preset

    preset = _preset(tmp_path, arms=("fp16", "bitnet", "hgf_std"))
    with preset.open("a") as f:
        f.write('[variant.gate_channel]\narm = "hgf_std"\nhgf = { gate_mode = "channel" }\n'
                '[variant.gate_input]\narm = "hgf_std"\nhgf = { gate_mode = "input" }\n')
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4",
                 "--variants", "gate_channel,gate_input"]) == 0
    for name in ("gate_channel", "gate_input"):
        run = out / "variants" / f"{name}-4steps-seed0"
        assert json.loads((run / "done.json").read_text())["status"] == "ok"
        rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("gate_range" in r for r in rec)


def test_reproduce_preset_convert_dispatches_to_the_conversion_study(study, capsys):
    out = study / "empty"
    assert main(["reproduce", "--preset", "convert", "--report-only", "--out", str(out)]) == 0
    assert f"report: {out / 'convert.md'}" in capsys.readouterr().out
    assert (out / "convert.md").read_text().startswith("# From a full-precision model")
    assert main(["reproduce", "--preset", "convert", "--variants", "all"]) == 2
    assert "--variants does not apply to the conversion study" in capsys.readouterr().err
    # --seed-index reaches the study (one process per seed)
    assert main(["reproduce", "--preset", "convert", "--report-only", "--out", str(out),
                 "--seed-index", "-1"]) == 2
    assert "--seed-index must be >= 0, got -1" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "methods", "--report-only", "--seed-index", "0"]) == 2
    assert "--seed-index applies to grid presets and the conversion study" in capsys.readouterr().err


def test_bad_study_tables_fail_in_one_line(study, capsys):
    path = study / "configs" / "reproduce" / "why_tokens.toml"
    text = path.read_text()
    path.write_text(text.replace('rule = "recovery"', 'rule = "vibes"'))
    assert main(["reproduce", "--preset", "why_tokens", "--report-only"]) == 2
    assert "unknown rule 'vibes' (known: recovery" in capsys.readouterr().err
    path.write_text(text.replace('name = "why"', 'name = "why"\nnmae = 1'))
    assert main(["reproduce", "--preset", "why_tokens", "--report-only"]) == 2
    assert "unknown key study.nmae" in capsys.readouterr().err


def test_without_a_gap_the_recovery_is_judged_on_the_difference_with_bitnet(study):
    """fp16 above bitnet (an FP baseline at a poor LR): no ratio, a verdict on L_bitnet − L_arm."""
    runs = study / "results" / "why_width" / "runs"
    losses = {"fp16": (3.50, 3.58), "bitnet": (3.455, 3.46), "hgf": (3.50, 3.51),
              "hgf_std": (3.456, 3.462)}
    for arm, pair in losses.items():
        for seed, loss in enumerate(pair):
            fake_run(runs / f"{arm}-2500steps-seed{seed}", loss, arm=arm, steps=2500, seed=seed)
    assert main(["reproduce", "--preset", "why_width", "--report-only"]) == 0
    md = (study / "results/cpu/why.md").read_text()
    exp2 = md[md.index("## Experiment 2"):md.index("## Experiment 3")]
    assert "| hgf | hgf | 0.002 | 2 | 3.5050 ± 0.0071 |" in exp2
    assert "| — |" in exp2.split("| hgf | hgf |")[1].splitlines()[0]  # no ratio in the table
    assert "no ternary gap to recover here: fp16 3.5400 is not below bitnet 3.4575" in exp2
    se = math.sqrt((0.005 / math.sqrt(2)) ** 2 / 2 + (0.01 / math.sqrt(2)) ** 2 / 2)
    assert f"hgf: L_bitnet − L_hgf = {-0.0475:+.4f} ± {se:.4f}" in exp2
    # bitnet_diff's two seeds, the fp16 LR variants' and the two oracle probes are still to run
    assert "Not yet run (10 runs): bitnet_diff 2500 steps (seed 0, 1), fp16_lr2e-3 2500 steps " \
        "(seed 0, 1), fp16_lr1e-3 2500 steps (seed 0, 1), fp16_lr5e-4 2500 steps (seed 0, 1), " \
        "oracle probe" in exp2
    # hgf is clearly worse (refuted), hgf_std within the noise (undecided): undecided overall
    assert "**Verdict (2500 steps): undecided at this budget.**" in exp2


def test_the_fp16_reference_is_the_best_of_its_candidates(study):
    """Experiment 2 measures the gap against the best of fp16 and its LR variants."""
    width = study / "results" / "why_width"
    losses = {"fp16": (3.50, 3.58), "bitnet": (3.455, 3.46), "hgf_std": (3.40, 3.41)}
    for arm, pair in losses.items():
        for seed, loss in enumerate(pair):
            fake_run(width / "runs" / f"{arm}-2500steps-seed{seed}", loss, arm=arm, steps=2500,
                     seed=seed)
    for seed, loss in enumerate((3.30, 3.31)):
        fake_run(width / "variants" / f"fp16_lr2e-3-2500steps-seed{seed}", loss, arm="fp16",
                 steps=2500, seed=seed, variant="fp16_lr2e-3")
    assert main(["reproduce", "--preset", "why_width", "--report-only"]) == 0
    md = (study / "results/cpu/why.md").read_text()
    exp2 = md[md.index("## Experiment 2"):md.index("## Experiment 3")]
    assert "| fp16_lr2e-3 | fp16 | 0.002 | 2 | 3.3050 ± 0.0071 |" in exp2
    assert ("- FP16 reference at 2500 steps: `fp16_lr2e-3` (LR 0.002, 3.3050), the lowest of "
            "`fp16` 3.5400, `fp16_lr2e-3` 3.3050") in exp2
    assert "no ternary gap" not in exp2
    r = gap_recovery(3.4575, 3.405, 3.305)
    assert f"| hgf_std | hgf_std | 0.002 | 2 | 3.4050 ± 0.0071 | {3.405 / 2.8:.4f} ± 0.0025 | " \
           f"0/2 | " in exp2 and f"{r:.3f} ± " in exp2


def test_an_fp16_candidate_must_be_an_fp16_run(tmp_path, capsys):
    src = (ROOT / "configs" / "reproduce" / "why_width.toml").read_text()
    bad = tmp_path / "w.toml"
    candidates = 'fp16 = ["fp16", "fp16_lr2e-3", "fp16_lr1e-3", "fp16_lr5e-4"]'
    assert candidates in src
    bad.write_text(src.replace(candidates, 'fp16 = ["fp16", "gate_channel"]'))
    assert main(["reproduce", "--preset", str(bad), "--report-only"]) == 2
    assert "fp16 candidate 'gate_channel' is neither the fp16 arm nor an fp16 variant" in \
        capsys.readouterr().err


def test_run_commits_count_each_start_and_resume_of_each_run_once(tmp_path):
    from hgf.reproduce.report import run_commits

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({
        "git": {"commit": "a" * 40, "dirty": False},
        "restarts": [{"git": {"commit": "b" * 40, "dirty": True}},
                     {"git": {"commit": "a" * 40, "dirty": False}}]}))
    # the same run read by two experiments, and a folder without run_info.json
    assert run_commits([run, tmp_path / "run", tmp_path / "none"]) == {"a" * 10: 2,
                                                                     "b" * 10 + "+dirty": 1}
