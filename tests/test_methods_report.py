"""The methods report (hgf.reproduce.methods) from fake run folders written by the test: the
expected numbers, "not measured" / "not run" lines for what is missing, and the dispatch of
``hgf reproduce --preset methods --report-only``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hgf.cli import main as cli
from hgf.config import load_config
from hgf.reproduce import methods
from test_why import fake_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu(study):
    """results/cpu with fp16 (1 seed), bitnet (3), hgf_std (2), tequila (1); no hgf, no sherry."""
    out = study / "results" / "cpu"
    losses = {"fp16": [3.0], "bitnet": [3.5, 3.52, 3.48], "hgf_std": [3.4, 3.42],
              "tequila": [3.3]}
    for arm, ls in losses.items():
        for seed, loss in enumerate(ls):
            fake_run(out / "runs" / f"{arm}-2500steps-seed{seed}", loss, arm=arm, steps=2500,
                     seed=seed)
    # an unfinished run: listed, never read
    (out / "runs" / "sherry-2500steps-seed0").mkdir()
    return out


def _row(text: str, arm: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))


def test_report_numbers_and_missing_parts(cpu):
    assert methods.main(["--cpu", str(cpu)]) == 0
    text = (cpu / "methods.md").read_text()
    bitnet = _row(text, "bitnet")
    assert "| 3 | 3.5000 ± 0.0200 |" in bitnet
    assert f"{3.5 / 2.8:.4f} ± {0.02 / 2.8:.4f}" in bitnet  # bits/byte of the fake runs
    assert "2.00 (i2)" in bitnet and "not measured" in bitnet
    hs = _row(text, "hgf_std")
    assert "| 2 | 3.4100 ± 0.0141 |" in hs
    # gap recovery (3.5 − 3.41)/(3.5 − 3.0), SE unknown: fp16 has one seed
    assert "0.180 ± ?" in hs
    assert "| 1 | 3.3000 ± ? |" in _row(text, "tequila")
    assert "not finished" in _row(text, "sherry") and "not run" in _row(text, "hgf")
    assert "Not run: hgf —" in text
    assert "sherry-2500steps-seed0" in text.split("Still running")[1].splitlines()[0]
    assert "Decode speed: not measured" in text and "hgf bench infer --device cpu" in text
    assert "## Conversion without training" in text
    assert "python -m hgf.reproduce.methods --convert" in text  # not measured: its command
    reading = text.split("## Reading")[1]
    assert "**tequila** (3.3000" in reading
    # hgf_std − bitnet = −0.09; 2·SE = 2·sqrt(0.02²/3 + 0.01414²/2) = 0.0302
    assert "L_hgf_std − L_bitnet = -0.0900, larger than twice its standard error (0.0306)" \
        in reading
    assert "seed noise is unknown" in reading  # tequila: one seed
    assert (cpu / "methods.png").is_file()


def test_stored_bits_from_the_packing_registry(study):
    def bits(arm):
        return methods.stored_bits(load_config(f"configs/{arm}.toml", ["--model.size=tiny"]))

    bn, teq, sh, hgf, fp = (bits(a) for a in ("bitnet", "tequila", "sherry", "hgf_std", "fp16"))
    assert fp == {"fp16": 16.0}
    assert set(bn) == {"i2", "tq1"} and bn["i2"] == pytest.approx(2.0, abs=2e-3)
    assert 1.6 <= bn["tq1"] < 1.63  # ceil(in / 5) bytes per row
    assert sh["sherry"] == pytest.approx(1.25, abs=2e-3) and sh["i2"] == pytest.approx(bn["i2"])
    # Tequila's float32 bias: 32 bits per output row, spread over the row's weights
    assert teq["i2"] > bn["i2"] + 0.05
    corr = methods.correction_bits(load_config("configs/hgf_std.toml", ["--model.size=tiny"]))
    assert corr > 0 and hgf["i2"] == pytest.approx(bn["i2"] + corr, abs=1e-6)
    bias = methods.correction_bits(load_config("configs/tequila.toml", ["--model.size=tiny"]))
    assert teq["i2"] == pytest.approx(bn["i2"] + bias, abs=1e-6)


def test_bench_and_conversion_records_are_shown(cpu):
    bench = cpu / "methods" / "bench_infer.json"
    bench.parent.mkdir(parents=True)
    rec = {"system": "hgf", "threads": 1, "engine": "native"}
    bench.write_text(json.dumps({"env": {"cpu": "test cpu"}, "decode": [
        {**rec, "arm": "bitnet-std", "packing": "i2", "cpu_ms_per_token": 12.5},
        {**rec, "arm": "bitnet-std", "packing": "tq1", "cpu_ms_per_token": 11.25},
        {**rec, "arm": "tequila-std", "packing": "i2", "cpu_ms_per_token": 13.0},
        {**rec, "arm": "ptqtp-std", "packing": "i2", "cpu_ms_per_token": 20.0}]}))
    conv = {"source": "runs/fp", "source_steps": 10, "source_tokens_per_step": 512,
            "command": "python -m hgf.reproduce.methods --convert runs/fp", "models": {
                "fp": {"label": "FP", "val_loss": 3.0, "val_bpb": 1.0,
                       "stored_bits": {"fp16": 16.0}, "command": "hgf train"},
                "absmean_ptq": {"label": "absmean", "val_loss": 4.0, "val_bpb": 1.4,
                                "stored_bits": {"i2": 2.0, "tq1": 1.6}, "command": "c1"},
                "ptqtp": {"label": "PTQTP", "val_loss": 3.1, "val_bpb": 1.05,
                          "stored_bits": {"i2": 4.5, "tq1": 3.7}, "command": "c2"}}}
    (cpu / "methods" / "conversion.json").write_text(json.dumps(conv))
    assert methods.main(["--cpu", str(cpu)]) == 0
    text = (cpu / "methods.md").read_text()
    assert "12.50 (i2) · 11.25 (tq1)" in _row(text, "bitnet")
    assert "13.00 (i2)" in _row(text, "tequila")
    assert "not measured" in _row(text, "hgf_std")
    assert "Decode speed from" in text and "test cpu" in text
    ptqtp = next(line for line in text.splitlines() if line.startswith("| PTQTP |"))
    assert ("| 3.1000 | +0.1000 | 1.0500 | 0.900 | — | 4.50 (i2) · 3.70 (tq1) | 20.00 (i2) | `c2` |"
            in ptqtp)
    absmean = next(line for line in text.splitlines() if line.startswith("| absmean |"))
    assert "| 12.50 (i2) · 11.25 (tq1) | `c1` |" in absmean
    assert "PTQTP's loss is -0.9000 nats against absmean ternarization (90.0%" in text


def test_one_seed_everywhere_never_crashes(study):
    out = study / "results" / "cpu"
    fake_run(out / "runs" / "bitnet-2500steps-seed0", 3.5, arm="bitnet", steps=2500)
    fake_run(out / "runs" / "sherry-2500steps-seed0", float("nan"), arm="sherry", steps=2500,
             diverged=True)
    assert methods.main(["--cpu", str(out)]) == 0
    text = (out / "methods.md").read_text()
    assert "not run" in _row(text, "fp16")
    assert "| 1 (1 diverged) | — |" in _row(text, "sherry")
    assert math.isfinite(3.5) and "**bitnet** (3.5000" in text


def test_reproduce_preset_methods_dispatches_to_the_report(cpu, capsys):
    assert cli(["reproduce", "--preset", "methods", "--report-only", "--out", str(cpu)]) == 0
    assert (cpu / "methods.md").is_file()
    assert "methods report" in capsys.readouterr().out
    assert cli(["reproduce", "--preset", "methods", "--out", str(cpu)]) == 2  # runs nothing
    assert "--report-only" in capsys.readouterr().err
    assert cli(["reproduce", "--preset", "methods", "--report-only", "--steps", "5"]) == 2


def test_finetune_section_reads_the_conversion_study(cpu):
    """The FP -> ternary table comes from <cpu>/<preset>.json (convert_study.write_report)."""
    def row(arm, kind, n, loss, std, ref=None, rec=math.nan, bits=2.0):
        return {"arm": arm, "kind": kind, "n": n, "val_loss": loss, "val_loss_std": std,
                "val_bpb": loss / 2.8, "val_bpb_std": std / 2.8, "reference": ref,
                "gap_recovery": rec, "bits_i2": bits}
    rows = {"fp": row("fp", "fp", 1, 3.0, math.nan, bits=16.0),
            "qat_kd": row("qat_kd", "qat_kd", 2, 3.5, 0.01),
            "tequila_kd": row("tequila_kd", "tequila_kd", 2, 3.45, 0.02, "qat_kd", 0.1, 2.04),
            "ptqtp": row("ptqtp", "ptqtp", 1, 3.2, math.nan, "ptq", 0.6, 4.4),
            "scratch": row("scratch", "scratch", 2, 3.6, 0.01)}
    (cpu / "convert_tiny.json").write_text(json.dumps(
        {"fp_steps": 2000, "ft_steps": 500, "seeds": 2, "rows": rows}))
    assert methods.main(["--cpu", str(cpu)]) == 0
    text = (cpu / "methods.md").read_text().split("## From a full-precision model")[1]
    tiny, full = text.split("Preset `convert`")
    assert "2000 FP steps, 500 fine-tuning steps, 2 seeds" in tiny
    assert "| tequila_kd | 2 | 3.4500 ± 0.0200 |" in tiny and "| 0.100 vs qat_kd | 2.04 |" in tiny
    assert "| ptqtp | 1 | 3.2000 ± ? |" in tiny and "0.600 vs ptq | 4.40 |" in tiny
    assert "| scratch |" not in tiny  # not a method of this comparison
    assert tiny.index("| qat_kd |") < tiny.index("| tequila_kd |")
    assert "not measured yet (`hgf reproduce --preset convert`" in full


def test_methods_main_fails_in_one_line(tmp_path, capsys):
    """A bad preset or an unwritable report: one line and status 2, not a traceback."""
    assert methods.main(["--preset", "nope", "--cpu", str(tmp_path)]) == 2
    assert "unknown reproduce preset 'nope'" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert methods.main(["--cpu", str(tmp_path), "--out", str(blocker / "methods.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hgf: error: ") and "a_file" in err and len(err.splitlines()) == 1
