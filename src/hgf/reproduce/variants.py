"""The variant study: ``variants.md`` + ``variants.json`` + one PNG per regime.

A variant (``[variant.NAME]`` in a reproduce preset) changes one arm (rank, targets, gate
schedule, init, learning rates) to ask why an arm does what it does. Each is compared with the
grid's runs at the same regime:

- Δ vs its arm: L_variant − L_arm (negative = the change helped);
- gap recovery (L_ternary − L_variant)/(L_ternary − L_fp16) against ``bitnet`` and against the
  ternary arm with the same attention (``bitnet`` for standard, ``bitnet_diff`` for differential);
- the correction's memory overhead at 2 bits/weight (:mod:`hgf.memory`), and the final gates.

Seed noise: where the grid holds more than one seed of an arm (``--seeds``), the table gives the
standard deviation, which is what a Δ has to beat to mean anything.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from hgf.memory import report_for_config
from hgf.reproduce.grid import Preset, RunSpec
from hgf.reproduce.report import _fmt, _mean_std, gap_recovery, summarize_run
from hgf.runs import atomic_write_text

REFERENCE_ARMS = ("fp16", "bitnet", "bitnet_diff", "hgf", "hgf_std")


def _summaries(specs: list[RunSpec]) -> list[dict[str, Any]]:
    return [r for r in (summarize_run(s) for s in specs) if r is not None]


def _rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± std of the final validation loss per label (variant or arm)."""
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["variant"] or r["arm"] for r in runs):
        rs = [r for r in runs if (r["variant"] or r["arm"]) == label]
        mean, std = _mean_std([r["val_loss"] for r in rs])
        gates = [v for r in rs if r["gates"] for v in r["gates"][-1][1].values()]
        out[label] = {"arm": rs[0]["arm"], "n": len(rs), "val_loss": mean, "val_loss_std": std,
                      "diverged": sum(r["diverged"] for r in rs), "lr": rs[0]["lr"],
                      "gate_mean": statistics.fmean(gates) if gates else math.nan}
    return out


def aggregate_variants(preset: Preset, variant_specs: list[RunSpec],
                       grid_specs: list[RunSpec]) -> dict[str, Any]:
    by_name = {s.variant: s for s in variant_specs}
    runs = _summaries(variant_specs)
    grid = _summaries(grid_specs)
    overhead = {}
    for name, spec in by_name.items():
        if spec.cfg.model.linear == "hgf":
            overhead[name] = report_for_config(spec.cfg).overhead("i2")
    for arm in ("hgf", "hgf_std"):
        spec = next((s for s in grid_specs if s.arm == arm), None)
        if spec is not None:
            overhead[arm] = report_for_config(spec.cfg).overhead("i2")
    regimes: dict[str, Any] = {}
    for steps in sorted({r["steps"] for r in runs}):
        refs = _rows([r for r in grid if r["steps"] == steps and r["arm"] in REFERENCE_ARMS])
        vars_ = _rows([r for r in runs if r["steps"] == steps])
        loss = {k: v["val_loss"] for k, v in refs.items()}
        for name, row in vars_.items():
            spec = by_name[name]
            same = "bitnet_diff" if spec.cfg.model.attention == "differential" else "bitnet"
            row["about"] = preset.variants[name].about if name in preset.variants else ""
            row["delta_vs_arm"] = row["val_loss"] - loss.get(row["arm"], math.nan)
            row["gap_recovery_vs_bitnet"] = gap_recovery(
                loss.get("bitnet", math.nan), row["val_loss"], loss.get("fp16", math.nan))
            row["gap_recovery_vs_same_attention"] = gap_recovery(
                loss.get(same, math.nan), row["val_loss"], loss.get("fp16", math.nan))
            row["same_attention_reference"] = same
            row["overhead_i2"] = overhead.get(name, 0.0)
        for arm, row in refs.items():
            row["overhead_i2"] = overhead.get(arm, 0.0)
        regimes[str(steps)] = {"reference": refs, "variants": vars_}
    missing = [f"{s.variant} {s.steps} steps seed {s.seed_index}"
               for s in variant_specs if not s.done]
    return {"preset": preset.name, "regimes": regimes, "missing": missing, "runs": runs,
            "grid_runs": grid}


def _pct(x: float) -> str:
    return f"{x:.1%}" if x else "—"


def render_variants(res: dict[str, Any], command: str) -> str:
    out = [f"# hgf reproduce: variant study, preset `{res['preset']}`", "",
           f"Command: `{command}`", "",
           "Δ = L_variant − L_arm at the same regime (negative: the change helped). Gap recovery "
           "(L_ternary − L)/(L_ternary − L_fp16) against `bitnet` and against the ternary arm with "
           "the same attention. Losses are full-validation nats/token; ± is the std over seeds.", ""]
    if res["missing"]:
        out += [f"**Incomplete: {len(res['missing'])} run(s) not finished** "
                f"({', '.join(res['missing'])}); rerun the command to resume them.", ""]
    for steps, reg in res["regimes"].items():
        out += [f"## {steps} steps", "", "Grid arms (the references):", "",
                "| arm | seeds | val loss | overhead (i2) | final gate mean |", "|---|---|---|---|---|"]
        for arm, r in reg["reference"].items():
            pm = f" ± {r['val_loss_std']:.4f}" if r["n"] > 1 else ""
            out.append(f"| {arm} | {r['n']} | {_fmt(r['val_loss'])}{pm} | "
                       f"{_pct(r['overhead_i2'])} | {_fmt(r['gate_mean'], '.3f')} |")
        out += ["", "| variant | arm | question | seeds | val loss | Δ vs arm | gap rec. vs bitnet "
                "| gap rec. vs same attention | overhead (i2) | final gate mean | diverged |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in reg["variants"].items():
            pm = f" ± {r['val_loss_std']:.4f}" if r["n"] > 1 else ""
            out.append(
                f"| {name} | {r['arm']} | {r['about']} | {r['n']} | {_fmt(r['val_loss'])}{pm} | "
                f"{_fmt(r['delta_vs_arm'], '+.4f')} | {_fmt(r['gap_recovery_vs_bitnet'], '.3f')} | "
                f"{_fmt(r['gap_recovery_vs_same_attention'], '.3f')} "
                f"({r['same_attention_reference']}) | {_pct(r['overhead_i2'])} | "
                f"{_fmt(r['gate_mean'], '.3f')} | {r['diverged']}/{r['n']} |")
        out += ["", f"![final losses, {steps} steps](variants_final_{steps}.png)", "",
                f"![validation loss of the variants, {steps} steps](variants_{steps}.png)", ""]
    return "\n".join(out) + "\n"


def write_variants(preset: Preset, variant_specs: list[RunSpec], grid_specs: list[RunSpec],
                   out: Path, command: str = "") -> Path:
    from hgf.reproduce.plots import plot_final_losses, plot_val_curves

    res = aggregate_variants(preset, variant_specs, grid_specs)
    grid = res.pop("grid_runs")  # summarised once, for the table and both plots
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "variants.json", json.dumps(res, indent=1, default=str) + "\n")
    regimes = {r["steps"] for r in res["runs"]}
    refs = [r for r in grid
            if r["arm"] in ("fp16", "bitnet", "hgf", "hgf_std") and r["steps"] in regimes]
    plot_val_curves(res["runs"] + refs, out, prefix="variants", title="Variants vs grid arms")
    for steps in sorted(regimes):
        rows = []
        for label in [*REFERENCE_ARMS, *res["regimes"][str(steps)]["variants"]]:
            rs = [r for r in (grid if label in REFERENCE_ARMS else res["runs"])
                  if r["steps"] == steps and (r["variant"] or r["arm"]) == label]
            if rs:
                rows.append((label, [r["val_loss"] for r in rs]))
        bitnet = res["regimes"][str(steps)]["reference"].get("bitnet")
        band = (bitnet["val_loss"], bitnet["val_loss_std"]) if bitnet else None
        plot_final_losses(rows, band, out / f"variants_final_{steps}.png",
                          f"Final loss per arm and variant, {steps} steps (band: bitnet ± std)")
    if not command:  # the command that rebuilds this report: the regimes measured, if not all
        command = f"hgf reproduce --preset {preset.name} --variants all"
        if regimes and regimes != set(preset.steps):
            command += f" --steps {','.join(map(str, sorted(regimes)))}"
    atomic_write_text(out / "variants.md", render_variants(res, command))
    return out / "variants.md"
