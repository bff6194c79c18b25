"""The "why" study (issue 15): ``results/cpu/why.md`` and its plots, from whatever runs exist.

Every reproduce preset whose ``[study]`` has the same ``name`` (``why``) contributes its
experiments, in ``number`` order; each is one ``[[study.experiment]]`` table:

    number, title, hypothesis, prediction   the text of the report
    runs        grid | variants | all       which of the preset's runs it reads (default grid)
    variants    the variants it reads (default: all of the preset's, when runs reads variants)
    rule        how the verdict is computed from the numbers (RULES below)
    arms        the corrected arms the recovery rules read (default hgf and hgf_std, if run)
    steps       the regime the rule reads (default the preset's longest); given, variants are
                expected at that regime only, and a ``runs = variants`` experiment shows only it
    reference   the ternary arm of the gap recovery (default bitnet)
    min_effect  the smallest effect that counts as the prediction holding (default 0)
    baseline    recovery_vs_baseline: the preset whose runs (default out folder) are the baseline
    baseline_runs  {arm = run label}: which baseline run stands for an arm (default the arm; a
                variant name picks e.g. the baseline's equal-LR control)
    differences [[a, b], ...]: L_a − L_b ± its standard error shown at the rule's regime (and in
                the baseline's runs), e.g. the cost of differential attention; not in the verdict
    oracle      commands of oracle probes (``python -m hgf.reproduce.oracle ... --out X.json``):
                shown when X.json exists, else listed as not yet run

Rules. ``judge`` turns a measured quantity q with standard error s into a verdict: **supported**
when q − 2s > 0 and q > min_effect; **refuted** when q + 2s < min_effect (even the favourable end
falls short); otherwise **undecided at this budget**; with one seed of a cell s is unknown
(undecided). A rule with no runs of the cells it needs says **not yet measured**.

    recovery              q = gap recovery (L_ref − L_arm)/(L_ref − L_fp16) of each arm
    recovery_vs_baseline  q = the same recovery here minus in the baseline preset's runs
    vs_arm                q = L_arm − L_variant (nats) of each variant against the arm it changes
    stability             supported when, at some LR, bitnet or diff_only diverge in at least half
                          their seeds and hgf/hgf_std in none; refuted when every cell ran and no LR
                          has a baseline diverging more often than the corrected arms

Several arms: supported (refuted) when every arm is; else undecided. Missing cells are listed
with the ``hgf reproduce`` command that runs them. Runs are read from each preset's default out
folder (``results/<preset>``) unless the invoking command names another.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from hgf.config import ConfigError, read_toml
from hgf.reproduce.grid import (
    Preset,
    RunSpec,
    configs_dir,
    finished_extras,
    load_preset,
    plan_grid,
    plan_variants,
)
from hgf.reproduce.report import (
    _finite,
    _fmt,
    _mean_std,
    commits_line,
    gap_recovery,
    gap_recovery_se,
    run_commits,
    summarize_run,
)
from hgf.runs import atomic_write_text

REPORT_DIR = Path("results/cpu")
EXPERIMENT_KEYS = {"number", "title", "hypothesis", "prediction", "runs", "variants", "rule",
                   "arms", "steps", "reference", "min_effect", "baseline", "baseline_runs",
                   "differences", "oracle", "fp16"}
RULES = ("recovery", "recovery_vs_baseline", "vs_arm", "stability")
UNSTABLE, STABLE = ("bitnet", "diff_only"), ("hgf", "hgf_std")


# ---------------------------------------------------------------------------------------------
# Which presets, which runs


def study_presets(name: str) -> list[Preset]:
    """The grid presets under ``configs/reproduce`` whose ``[study] name`` is ``name``."""
    out = []
    for path in sorted((configs_dir() / "reproduce").glob("*.toml")):
        d = read_toml(path)
        if "grid" in d and d.get("study", {}).get("name") == name:
            out.append(load_preset(str(path)))
    return out


def experiments(preset: Preset) -> list[dict[str, Any]]:
    """The preset's ``[[study.experiment]]`` tables, checked (unknown keys, rules, variants)."""
    bad = set(preset.study) - {"name", "experiment"}
    if bad:
        raise ConfigError(f"{preset.path}: unknown key study.{sorted(bad)[0]} (known: name, "
                          "experiment)")
    exps = preset.study.get("experiment", [])
    for e in exps:
        where = f"{preset.path}: [[study.experiment]] {e.get('number', '?')}"
        bad = set(e) - EXPERIMENT_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown key {sorted(bad)[0]}")
        if e.get("rule", "recovery") not in RULES:
            raise ConfigError(f"{where}: unknown rule {e['rule']!r} (known: {', '.join(RULES)})")
        for v in e.get("variants", []):
            if v not in preset.variants:
                raise ConfigError(f"{where}: unknown variant {v!r}")
        for v in e.get("fp16", []):
            if v != "fp16" and (v not in preset.variants or preset.variants[v].arm != "fp16"):
                raise ConfigError(f"{where}: fp16 candidate {v!r} is neither the fp16 arm nor an "
                                  "fp16 variant of this preset")
    return exps


def _specs(preset: Preset, out: Path) -> tuple[list[RunSpec], list[RunSpec]]:
    """(grid specs, variant specs): the preset's planned runs plus every finished extra."""
    grid = plan_grid(preset, out)
    var = plan_variants(preset, out) if preset.variants else []
    return (grid + finished_extras(preset, out, grid),
            var + finished_extras(preset, out, var, kind="variants"))


def cells(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Mean ± std over seeds per (label, steps); the label is the variant name or the arm."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for key in dict.fromkeys((r["variant"] or r["arm"], r["steps"]) for r in runs):
        rs = [r for r in runs if (r["variant"] or r["arm"], r["steps"]) == key]
        row = {"label": key[0], "arm": rs[0]["arm"], "steps": key[1], "lr": rs[0]["lr"],
               "n": len(rs), "diverged": sum(r["diverged"] for r in rs),
               "largest_spike": max(r["largest_spike"] for r in rs),
               "losses": [r["val_loss"] for r in rs]}
        for k in ("val_loss", "val_bpb"):
            row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
        out[key] = row
    return out


def _recovery(c: dict, label: str, steps: int, ref: str) -> tuple[float, float | None]:
    """Gap recovery of ``label`` against ``ref`` and fp16; NaN without the runs or without a gap
    (fp16 not below the ternary reference: the ratio means nothing, see :func:`_no_gap`)."""
    t, a, f = c.get((ref, steps)), c.get((label, steps)), c.get(("fp16", steps))
    if t is None or a is None or f is None or _no_gap(c, steps, ref):
        return math.nan, None
    return (gap_recovery(t["val_loss"], a["val_loss"], f["val_loss"]),
            gap_recovery_se(t, a, f))


# ---------------------------------------------------------------------------------------------
# Verdicts


def judge(q: float, s: float | None, m: float = 0.0) -> str:
    if not _finite(q):
        return "not yet measured"
    if s is None:
        return "undecided at this budget"
    if q - 2 * s > 0 and q > m:
        return "supported"
    if q + 2 * s < m:
        return "refuted"
    return "undecided at this budget"


def _combine(verdicts: list[str]) -> str:
    if not verdicts or all(v == "not yet measured" for v in verdicts):
        return "not yet measured"
    for v in ("supported", "refuted"):
        if all(x == v for x in verdicts):
            return v
    return "undecided at this budget"


def _pm(q: float, s: float | None, spec: str = ".3f") -> str:
    se = "" if not _finite(q) else " ± ?" if s is None else f" ± {s:{spec.lstrip('+')}}"
    return _fmt(q, spec) + se


def fp16_reference(c: dict, candidates: list[str]) -> tuple[dict, list[str]]:
    """``c`` with each regime's ("fp16", steps) cell replaced by the candidate (the fp16 arm or
    fp16 LR variants) of lowest loss, and one line per regime naming the choice: the FP model a
    gap is measured against, at its best LR among those run."""
    if not candidates:
        return c, []
    out, lines = dict(c), []
    for st in sorted({st for _, st in c}):
        rows = [c[(lab, st)] for lab in candidates if (lab, st) in c]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["val_loss"])
        out[("fp16", st)] = best
        lines.append(f"- FP16 reference at {st} steps: `{best['label']}` (LR {best['lr']:g}, "
                     f"{best['val_loss']:.4f}), the lowest of " + ", ".join(
                         f"`{r['label']}` {r['val_loss']:.4f}" for r in rows))
    return out, lines


def _no_gap(c: dict, steps: int, ref: str) -> tuple[dict, dict] | None:
    """(ref row, fp16 row) when both ran and fp16 does not reach below the ternary reference."""
    t, f = c.get((ref, steps)), c.get(("fp16", steps))
    return (t, f) if t is not None and f is not None and f["val_loss"] >= t["val_loss"] else None


def _diff(c: dict, a: str, b: str, steps: int) -> tuple[float, float | None]:
    """L_a − L_b (nats) and its standard error (None: a cell has one seed); NaN when one of the
    two cells has not run."""
    ra, rb = c.get((a, steps)), c.get((b, steps))
    if ra is None or rb is None:
        return math.nan, None
    s = (None if ra["n"] < 2 or rb["n"] < 2 else math.sqrt(
        ra["val_loss_std"] ** 2 / ra["n"] + rb["val_loss_std"] ** 2 / rb["n"]))
    return ra["val_loss"] - rb["val_loss"], s


def verdict(exp: dict, c: dict, steps: int, baseline: dict | None) -> tuple[str, str]:
    """(verdict, the numbers behind it) for one experiment. Without a gap (fp16 not below the
    ternary reference) a recovery is judged on L_ref − L_arm alone: supported when the arm beats
    the reference by twice its standard error, refuted when it is worse by as much."""
    rule, ref, m = exp.get("rule", "recovery"), exp.get("reference", "bitnet"), \
        float(exp.get("min_effect", 0.0))
    parts, verdicts = [], []
    no_gap = _no_gap(c, steps, ref) if rule in ("recovery", "recovery_vs_baseline") else None
    if no_gap is not None:
        t, f = no_gap
        parts.append(f"no ternary gap to recover here: fp16 {f['val_loss']:.4f} is not below "
                     f"{ref} {t['val_loss']:.4f}, so the recovery ratio is undefined; judged on "
                     f"L_{ref} − L_arm instead")
        for arm in exp["arms"]:
            q, s = _diff(c, ref, arm, steps)
            verdicts.append(judge(q, s))
            parts.append(f"{arm}: L_{ref} − L_{arm} = {_pm(q, s, '+.4f')}")
    elif rule in ("recovery", "recovery_vs_baseline"):
        for arm in exp["arms"]:
            q, s = _recovery(c, arm, steps, ref)
            text = f"{arm}: recovery {_pm(q, s)}"
            if rule == "recovery_vs_baseline":
                label = exp.get("baseline_runs", {}).get(arm, arm)
                b, bs = _recovery(baseline or {}, label, steps, ref)
                text += f" vs {_pm(b, bs)} in `{exp['baseline']}` ({label})"
                s = None if s is None or bs is None else math.hypot(s, bs)
                q = q - b
                text += f" (Δ {_pm(q, s, '+.3f')})"
            verdicts.append(judge(q, s, m))
            parts.append(text)
    elif rule == "vs_arm":
        for v in exp["variants"]:
            var = c.get((v, steps))
            q, s = _diff(c, var["arm"], v, steps) if var else (math.nan, None)
            if not _finite(q):
                verdicts.append("not yet measured")
                parts.append(f"{v}: not measured")
                continue
            verdicts.append(judge(q, s, m))
            parts.append(f"{v}: L_{var['arm']} − L_{v} = {_pm(q, s, '+.4f')}")
    else:
        return _stability(exp, c, steps)
    return _combine(verdicts), "; ".join(parts) + (f" (min effect {m:g})" if m else "")


def _by_lr(c: dict, steps: int) -> dict[str, dict[float, tuple[int, int]]]:
    """arm → LR → (diverged runs, runs), over grid arms and variants alike."""
    out: dict[str, dict[float, list[int]]] = {}
    for (_, st), row in c.items():
        if st == steps:
            d = out.setdefault(row["arm"], {}).setdefault(row["lr"], [0, 0])
            d[0] += row["diverged"]
            d[1] += row["n"]
    return {a: {lr: (k, n) for lr, (k, n) in d.items()} for a, d in out.items()}


def _stability(exp: dict, c: dict, steps: int) -> tuple[str, str]:
    div = _by_lr(c, steps)
    lrs = sorted({lr for d in div.values() for lr in d})
    if not any(a in div for a in UNSTABLE) or not any(a in div for a in STABLE):
        return "not yet measured", "no runs of a baseline and a corrected arm at the same LR"
    found, worse = [], False
    for lr in lrs:
        unstable = {a: div[a][lr] for a in UNSTABLE if lr in div.get(a, {})}
        stable = {a: div[a][lr] for a in STABLE if lr in div.get(a, {})}
        if not unstable or not stable:
            continue
        frac = {a: k / n for a, (k, n) in {**unstable, **stable}.items()}
        if max(frac[a] for a in unstable) > max(frac[a] for a in stable):
            worse = True
        if max(frac[a] for a in unstable) >= 0.5 and max(frac[a] for a in stable) == 0:
            found.append(lr)
    shown = "; ".join(f"LR {lr:g}: " + ", ".join(f"{a} {div[a][lr][0]}/{div[a][lr][1]}"
                                                for a in (*UNSTABLE, *STABLE) if lr in div.get(a, {}))
                      for lr in lrs)
    text = f"diverged runs per LR: {shown}"
    if found:
        return "supported", text
    if not exp.get("_missing") and not worse:
        return "refuted", text + " (no LR where a baseline diverged more often than hgf)"
    return "undecided at this budget", text


# ---------------------------------------------------------------------------------------------
# The report


def _missing_commands(preset: Preset, out: Path, specs: list[RunSpec], default_out: bool
                      ) -> list[str]:
    """One ``hgf reproduce`` command per regime that runs the unfinished specs."""
    cmds = []
    for kind in ("grid", "variants"):
        todo = [s for s in specs if not s.done and bool(s.variant) == (kind == "variants")]
        for steps in sorted({s.steps for s in todo}):
            ss = [s for s in todo if s.steps == steps]
            names = list(dict.fromkeys(s.variant or s.arm for s in ss))
            cmd = f"hgf reproduce --preset {preset.name}"
            if kind == "variants":
                cmd += f" --variants {'all' if set(names) == set(preset.variants) else ','.join(names)}"
            elif set(names) != set(preset.arms):
                cmd += f" --arms {','.join(names)}"
            cmd += f" --steps {steps} --seeds {max(s.seed_index for s in ss) + 1}"
            cmds.append(cmd + ("" if default_out else f" --out {out}"))
    return cmds


def _oracles(exp: dict, out: Path) -> tuple[list[Path], list[str]]:
    """(oracle JSON files present, commands of the ones not yet run); none for an experiment
    without an ``oracle`` list (another experiment of the same preset owns the probes)."""
    if not exp.get("oracle"):
        return [], []
    found, todo = sorted(out.glob("oracle*.json")), []
    for cmd in exp.get("oracle", []):
        words = shlex.split(cmd)
        dest = Path(words[words.index("--out") + 1]) if "--out" in words else None
        if dest is None or not dest.is_file():
            todo.append(cmd)
        elif dest.resolve() not in {f.resolve() for f in found}:
            found.append(dest)
    return found, todo


def _table(c: dict, steps: int, ref: str, c_ref: dict | None = None) -> list[str]:
    """One row per cell; the recovery column against ``c_ref``'s fp16 (default ``c``'s)."""
    c_ref = c if c_ref is None else c_ref
    lines = ["| run | arm | LR | seeds | val loss (nats/token) | bits/byte | diverged "
             "| largest spike | gap recovery vs " + ref + " |", "|---|---|---|---|---|---|---|---|---|"]
    for (label, st), r in c.items():
        if st != steps:
            continue
        fp_like = label == "fp16" or r["arm"] == "fp16"
        q, s = _recovery(c_ref, label, steps, ref) if label != ref and not fp_like \
            else (math.nan, None)
        loss, bpb = (_fmt(r[k]) + (f" ± {r[k + '_std']:.4f}" if r["n"] > 1 else "")
                     for k in ("val_loss", "val_bpb"))
        lines.append(f"| {label} | {r['arm']} | {r['lr']:g} | {r['n']} | {loss} | {bpb} | "
                     f"{r['diverged']}/{r['n']} | {_fmt(r['largest_spike'], '.3f')} | "
                     f"{_pm(q, s) if _finite(q) else '—'} |")
    return lines


def _plot(exp: dict, c: dict, steps: int, regimes: list[int], path: Path, title: str
          ) -> Path | None:
    """Loss against LR (stability), against steps (several regimes), else each run's final loss
    at the rule's regime (or the longest one with runs)."""
    from hgf.reproduce.plots import plot_final_losses, plot_loss_by

    if not c:
        return None
    if exp.get("rule") == "stability":
        series = {}
        for (_, st), r in c.items():
            if st == steps:
                series.setdefault(r["arm"], []).append((r["lr"], r["losses"], r["diverged"] > 0))
        return plot_loss_by(series, "learning rate", path, title)
    if len(set(regimes) | {st for _, st in c}) > 1:
        series = {}
        for (label, st), r in c.items():
            series.setdefault(label, []).append((st, r["losses"], r["diverged"] > 0))
        return plot_loss_by(series, "training steps", path, title)
    if not any(st == steps for _, st in c):
        steps = max(st for _, st in c)
    rows = [(label, r["losses"]) for (label, st), r in c.items() if st == steps]
    ref = c.get((exp.get("reference", "bitnet"), steps))
    band = (ref["val_loss"], ref["val_loss_std"]) if ref else None
    return plot_final_losses(rows, band, path, title)


def render_experiment(preset: Preset, exp: dict, out: Path, report_dir: Path, first: bool,
                      default_out: bool) -> tuple[list[str], list[dict], str]:
    """(the experiment's section, its runs, its line in the report's summary)."""
    grid, var = _specs(preset, out)
    reads = exp.get("runs", "grid")
    names = exp.get("variants") or list(preset.variants)
    fp_names = [v for v in exp.get("fp16", []) if v != "fp16"]
    var = [s for s in var if (s.variant in names and reads in ("variants", "all"))
           or s.variant in fp_names]
    refs = grid if reads in ("grid", "all") else [s for s in grid if s.arm in
                                                    ("fp16", exp.get("reference", "bitnet"),
                                                     *{preset.variants[n].arm for n in names})]
    steps = int(exp.get("steps", max(preset.steps)))
    planned = [s for s in (grid if reads in ("grid", "all") else []) + var
               if s.variant is None or "steps" not in exp or s.steps == steps]
    runs = [r for r in (summarize_run(s) for s in refs + var) if r is not None]
    c = cells(runs)
    c_ref, fp_lines = fp16_reference(c, exp.get("fp16", []))
    exp = {**exp, "variants": names, "_missing": [s for s in planned if not s.done]}
    exp.setdefault("arms", [a for a in STABLE if a in preset.arms])
    baseline = None
    if exp.get("rule") == "recovery_vs_baseline":
        base = load_preset(exp["baseline"])
        g, bv = _specs(base, Path("results") / base.name)
        baseline = cells([r for r in (summarize_run(s) for s in g + bv) if r is not None])
    v, numbers = verdict(exp, c_ref, steps, baseline)
    ref = exp.get("reference", "bitnet")
    n = exp.get("number", "?")
    lines = [f"## Experiment {n}: {exp.get('title', preset.name)}", "",
             f"Preset: `configs/reproduce/{preset.name}.toml`, runs in `{out}`.", "",
             f"**Hypothesis.** {exp.get('hypothesis', '—')}", "",
             f"**Prediction.** {exp.get('prediction', '—')}", ""]
    shown = sorted({st for _, st in c})
    if reads == "variants" and "steps" in exp:  # a variants experiment at one regime shows that one
        shown = [st for st in shown if st == steps]
    for st in shown:
        lines += [f"### {st} steps", "", *_table(c, st, ref, c_ref), ""]
    if fp_lines:
        lines += fp_lines + [""]
    if not c:
        lines += ["No finished runs yet.", ""]
    if exp.get("rule") == "stability" and c:
        lines += _best_lr_recovery(c, steps, ref)
    for a, b in exp.get("differences", []):
        shown = [f"{_difference(cs, a, b, steps)} {where}" for cs, where in
                 ((c, "here"), (baseline, f"in `{exp.get('baseline')}`")) if cs is not None]
        lines += [f"- L_{a} − L_{b} at {steps} steps: " + "; ".join(shown), ""]
    found, todo = _oracles(exp, out)
    if found:
        from hgf.reproduce.oracle import format_oracle

        lines += ["### Oracle probe", ""]
        for f in found:
            lines += [format_oracle(json.loads(f.read_text())), ""]
    plot = report_dir / (f"{preset.name}.png" if first else f"{preset.name}_{n}.png")
    if _plot(exp, c, steps, preset.steps, plot, f"Experiment {n} (preset {preset.name})"):
        lines += [f"![experiment {n}]({plot.name})", ""]
    lines += [f"**Verdict ({steps} steps): {v}.** {numbers}.", ""]
    groups: dict[tuple[str, int], list[int]] = {}
    for s in exp["_missing"]:
        groups.setdefault((s.variant or s.arm, s.steps), []).append(s.seed_index)
    missing = [f"{label} {st} steps (seed {', '.join(map(str, seeds))})"
               for (label, st), seeds in groups.items()]
    cmds = _missing_commands(preset, out, exp["_missing"], default_out) + todo
    n_runs = len(exp["_missing"]) + len(todo)
    runs_left = f"{n_runs} run{'s' * (n_runs != 1)}"
    summary = (f"- Experiment {n}, {exp.get('title', preset.name)}: **{v}** ({steps} steps)"
               + (f"; {runs_left} not yet run" if n_runs else ""))
    if missing or todo:
        lines += [f"Not yet run ({runs_left}): " + ", ".join(
                      missing + [f"oracle probe `{t.split('--out')[-1].strip()}`" for t in todo])
                  + ". Commands:", "",
                  *[f"    {cmd}" for cmd in cmds], ""]
    return lines, runs, summary


def _difference(c: dict, a: str, b: str, steps: int) -> str:
    q, s = _diff(c, a, b, steps)
    return _pm(q, s, "+.4f") if _finite(q) else "—"


def _best_lr_recovery(c: dict, steps: int, ref: str) -> list[str]:
    """Recovery of each corrected arm at its best LR against the reference arm at each LR."""
    best: dict[str, dict] = {}
    for (_, st), r in c.items():
        if (st == steps and not r["diverged"] and _finite(r["val_loss"])
                and (r["arm"] not in best or r["val_loss"] < best[r["arm"]]["val_loss"])):
            best[r["arm"]] = r
    if "fp16" not in best:
        return []
    lines = []
    for arm in STABLE:
        if arm not in best:
            continue
        vs = [(r["lr"], gap_recovery(r["val_loss"], best[arm]["val_loss"], best["fp16"]["val_loss"]),
               gap_recovery_se(r, best[arm], best["fp16"]))
              for (_, st), r in sorted(c.items(), key=lambda kv: kv[1]["lr"])
              if st == steps and r["arm"] == ref]
        if vs:
            lines.append(f"- {arm} at its best LR ({best[arm]['lr']:g}) recovers, against {ref} at "
                         "each LR (fp16 at its best): " + ", ".join(
                             f"LR {lr:g}: {_pm(q, se)}" for lr, q, se in vs))
    return lines + [""] if lines else []


def write_why(name: str = "why", outs: dict[str, Path] | None = None,
              report_dir: Path = REPORT_DIR) -> Path:
    """Write ``report_dir/why.md`` and its plots from every preset of the study ``name``;
    ``outs`` maps a preset to a non-default out folder."""
    outs = outs or {}
    items = sorted(((p, e, i == 0) for p in study_presets(name)
                    for i, e in enumerate(experiments(p))),
                   key=lambda t: t[1].get("number", 0))
    report_dir.mkdir(parents=True, exist_ok=True)
    body, dirs, summary = [], [], []
    for preset, exp, first in items:
        out = Path(outs.get(preset.name, Path("results") / preset.name))
        lines, runs, line = render_experiment(preset, exp, out, report_dir, first,
                                              preset.name not in outs)
        body += lines
        summary.append(line)
        dirs += [r["dir"] for r in runs]
    commits = run_commits(dirs)
    head = ["# Why does the correction recover none of the gap? (issue 15)", "",
            "Rebuilt from the runs that exist by `hgf reproduce --preset <why preset> --report-only` "
            "(any of " + ", ".join(f"`{p}`" for p in dict.fromkeys(p.name for p, _, _ in items))
            + "). Losses are full-validation nats/token, mean ± std over seeds; gap recovery "
            "(L_ref − L_arm)/(L_ref − L_fp16) ± its standard error (first order, from the seeds' "
            "standard errors; `± ?` with one seed). Verdicts: **supported** when the measured "
            "quantity exceeds 0 by twice its standard error (and the experiment's minimum effect), "
            "**refuted** when even its favourable end falls short, otherwise **undecided at this "
            "budget**; **not yet measured** without the runs (hgf.reproduce.why).", ""]
    if commits:
        head += [commits_line(commits), ""]
    head += ["## Verdicts", "", *summary, ""]
    path = report_dir / "why.md"
    atomic_write_text(path, "\n".join(head + body))
    return path
