"""The methods side by side (issue 17): ``results/cpu/methods.md`` and ``methods.png``.

Four parts, each read from what exists (a missing run or file is listed with the command that
makes it, never an error):

- **From scratch on the cpu grid** (``[study] grid`` preset, ``steps``): the arms of ``arms`` (fp16,
  bitnet, hgf, hgf_std, tequila, sherry) from ``<cpu>/runs/<arm>-<steps>steps-seed<k>``: full
  validation loss mean ± std over seeds, bits/byte, gap recovery (L_bitnet − L_arm)/(L_bitnet −
  L_fp16) ± its standard error (hgf.reproduce.report), bits per projection weight as stored in each
  packing the model can be stored in (hgf.kernels.packing; with the correction and gates of the
  hgf arms and Tequila's float32 bias, hgf.memory) and CPU decode ms/token of the native decoder
  from ``hgf bench infer --json`` (``decode_without_peer`` or ``decode`` records).
- **Conversion without training** from the FP run ``fp_source``: the source, BitNet's absmean
  ternarization of its weights (the conversion study's ``ptq`` arm,
  :func:`hgf.reproduce.convert_study.evaluate_without_training`) and PTQTP (``hgf convert --to
  ptqtp`` then ``hgf eval``), measured by ``--convert`` into ``<cpu>/methods/conversion.json``.
- **From a full-precision model, with equal fine-tuning tokens**: the conversion study's presets
  (``convert_presets``: convert_tiny, convert; hgf.reproduce.convert_study) read from
  ``<cpu>/<preset>.json``: BitNet QAT, HGF, Tequila and Sherry fine-tuned with distillation,
  absmean, PTQTP and HGF's SVD correction with no training.

A "Reading" paragraph is computed from the numbers: which arm has the lowest loss, which arms no
arm storing as few or fewer bits per weight beats by more than twice the standard error of the
difference (seed noise; unknown with one seed).

    python -m hgf.reproduce.methods [--cpu results/cpu] [--bench FILE] [--out FILE]
    python -m hgf.reproduce.methods --convert results/cpu/runs/fp16-2500steps-seed0
    hgf reproduce --preset methods --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hgf.config import ConfigError, read_toml
from hgf.errors import exit_code
from hgf.kernels.packing import PACKING_REGISTRY
from hgf.reproduce.grid import DONE_FILE, RunSpec, arm_config, load_preset, resolve_preset
from hgf.reproduce.report import (
    _finite,
    _fmt,
    _mean_std,
    commits_line,
    gap_recovery,
    gap_recovery_se,
    run_commits,
    summarize_run,
    twice_se,
)
from hgf.runs import atomic_write_text

DEFAULT_PRESET = "methods"
REPORT, PLOT, CONVERSION = "methods.md", "methods.png", "conversion.json"
FP_BITS = 16.0
# the grid arm -> the `hgf bench infer` arm of the same linear and attention
BENCH_ARMS = {"bitnet": "bitnet-std", "hgf_std": "hgf-std", "hgf": "hgf-diff",
              "tequila": "tequila-std", "sherry": "sherry-std",
              "absmean_ptq": "bitnet-std", "ptqtp": "ptqtp-std"}  # the no-training models
BENCH_COMMAND = ("hgf bench infer --device cpu --threads 1 --tokens 64 --rounds 5 --arms bitnet-std "
                 "hgf-std hgf-diff tequila-std sherry-std ptqtp-std --packings i2 tq1 sherry --dense float32 "
                 "--no-reference --gemv-sizes --peer llama.cpp --json {bench}")


def load_study(name_or_path: str = DEFAULT_PRESET) -> dict[str, Any]:
    """The ``[study]`` table of a methods preset (``name = "methods"``) with its defaults."""
    path = resolve_preset(name_or_path)
    s = dict(read_toml(path).get("study", {}))
    if s.get("name") != "methods":
        raise ConfigError(f"{path}: not a methods study ([study] name = \"methods\")")
    bad = set(s) - {"name", "grid", "steps", "arms", "fp_source", "about", "convert_presets"}
    if bad:
        raise ConfigError(f"{path}: unknown key study.{sorted(bad)[0]}")
    s.setdefault("grid", "cpu")
    s.setdefault("steps", 2500)
    s.setdefault("arms", ["fp16", "bitnet", "hgf", "hgf_std", "tequila", "sherry"])
    s.setdefault("fp_source", f"runs/fp16-{s['steps']}steps-seed0")
    s.setdefault("convert_presets", ["convert_tiny", "convert"])
    s["path"] = path
    return s


# ---------------------------------------------------------------------------------------------
# Storage


def _storable(rep) -> list[str]:
    return [p for p in rep.packings if PACKING_REGISTRY[p].storable]


def stored_bits(cfg) -> dict[str, float]:
    """Bits per ternary projection weight as stored, per packing the model can be stored in: the
    packed backbone with its scales, plus the FP16 correction and gates (hgf arms) and Tequila's
    float32 bias (hgf.memory); ``{"fp16": 16}`` for a dense model."""
    from hgf.memory import report_for_config

    rep = report_for_config(cfg)
    if not rep.ternary_shapes:
        return {"fp16": FP_BITS}
    n = rep.ternary_params
    return {p: 8 * (rep.backbone_bytes(p) + rep.correction_bytes + rep.bias_bytes) / n
            for p in _storable(rep)}


def correction_bits(cfg) -> float:
    """The share of :func:`stored_bits` beside the packed backbone: the correction and gates (hgf
    arms), Tequila's float32 bias (0 for the others)."""
    from hgf.memory import report_for_config

    rep = report_for_config(cfg)
    if not rep.ternary_shapes:
        return 0.0
    return 8 * (rep.correction_bytes + rep.bias_bytes) / rep.ternary_params


def ptqtp_stored_bits(cfg) -> dict[str, float]:
    """Bits per projection weight of a PTQTP model as stored (hgf.infer.ptqtp): both trit-planes
    in the packing plus two float32 row scales per output row."""
    from hgf.model.ptqtp import PTQTPLinear
    from hgf.model.transformer import build_model

    model = build_model(cfg, device="meta")
    shapes = [(m.out_features, m.in_features) for m in model.modules()
              if isinstance(m, PTQTPLinear)]
    n = sum(o * i for o, i in shapes)
    out = {}
    for name, p in PACKING_REGISTRY.items():
        if p.storable and p.sparsity is None:
            out[name] = 8 * sum(p.tensor_bytes(2 * o, i) + 8 * o for o, i in shapes) / n
    return out


def shown(path: Path | str) -> str:
    """``path`` as the report names it: relative to the working directory or the checkout
    (hgf.reproduce.report.shown_path), else from its ``results/`` folder on, so that a report
    built from another checkout's runs names no machine's absolute paths."""
    from hgf.reproduce.report import shown_path

    text = shown_path(Path(path))
    parts = Path(text).parts
    if Path(text).is_absolute() and "results" in parts:
        return Path(*parts[parts.index("results"):]).as_posix()
    return text


def _bits_text(bits: dict[str, float] | None) -> str:
    if not bits:
        return "—"
    return " · ".join(f"{b:.2f} ({p})" for p, b in sorted(bits.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------------
# Conversion without training (--convert)


def _final_record(run: Path) -> dict[str, Any] | None:
    from hgf.train.metrics import read_metrics

    return next((r for r in reversed(read_metrics(run)) if r.get("kind") == "final"), None)


def _run(cmd: list[str]) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def convert(fp_run: Path, out: Path) -> Path:
    """Measure the FP run, its absmean ternarization (the conversion study's ``ptq`` arm) and its
    PTQTP conversion on the full validation split; write ``out/conversion.json`` (the model folders
    ``out/absmean_ptq`` and ``out/ptqtp`` keep their compact records; weights are git-ignored)."""
    from hgf.reproduce.convert_study import evaluate_without_training
    from hgf.reproduce.grid import configs_dir
    from hgf.runs import load_run_config
    from hgf.train.init_from import build_train_config

    fp_run = Path(fp_run)
    src = load_run_config(fp_run)
    this = f"python -m hgf.reproduce.methods --convert {shown(fp_run)} --methods-dir {shown(out)}"
    final = _final_record(fp_run)
    if final is None:
        raise ConfigError(f"{fp_run}: no full-validation ('final') record in metrics.jsonl")
    info = fp_run / "run_info.json"
    fp_cmd = (shlex.join(json.loads(info.read_text()).get("command", [])) if info.is_file()
              else "")
    models: dict[str, Any] = {"fp": {
        "label": "FP source (dense)", "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
        "val_tokens": final.get("val_tokens"), "stored_bits": {"fp16": FP_BITS},
        "command": fp_cmd, "how": "the run's final full-validation record in its metrics.jsonl"}}

    ptq_dir = out / "absmean_ptq"
    bitnet = configs_dir() / "bitnet.toml"
    cfg = build_train_config(
        (read_toml(bitnet), str(bitnet)),
        ({"data": src.to_dict()["data"],
          "train": {"seed": src.train.seed, "batch_size": src.train.batch_size,
                    "seq_len": src.train.seq_len, "threads": 1, "steps": 1,
                    "out_dir": str(ptq_dir)},
          "init": {"from": str(fp_run)}}, "methods --convert"))
    res = evaluate_without_training(cfg, ptq_dir)
    models["absmean_ptq"] = {
        "label": "absmean ternarization (BitNet PTQ), no training", "val_loss": res["val_loss"],
        "val_bpb": res["val_bpb"], "val_tokens": res["val_tokens"], "stored_bits": stored_bits(cfg),
        "command": this, "how": "hgf.reproduce.convert_study.evaluate_without_training, the "
        "conversion study's `ptq` arm: configs/bitnet.toml with init.from the source "
        "(init.subln identity), full validation split"}

    pt_dir = out / "ptqtp"
    if pt_dir.exists():
        shutil.rmtree(pt_dir)
    conv = [sys.executable, "-m", "hgf", "convert", str(fp_run), "--to", "ptqtp", str(pt_dir)]
    ev = [sys.executable, "-m", "hgf", "eval", str(pt_dir), "--device", "cpu"]
    _run(conv)
    _run(ev)
    e = json.loads((pt_dir / "eval.json").read_text())
    models["ptqtp"] = {
        "label": "PTQTP (two trit-planes, row scales), no training", "val_loss": e["val_loss"],
        "val_bpb": e["val_bpb"], "val_tokens": e["val_tokens"],
        "stored_bits": ptqtp_stored_bits(load_run_config(pt_dir)),
        "command": f"hgf convert {shown(fp_run)} --to ptqtp {shown(pt_dir)} && "
                   f"hgf eval {shown(pt_dir)} --device cpu",
        "how": "defaults: <= 50 rounds, tol 1e-4, int8 activations; full validation split"}
    fit = json.loads((pt_dir / "ptqtp_fit.json").read_text())  # hgf convert's weight errors
    models["fp"]["weight_rel_error"] = 0.0
    models["absmean_ptq"]["weight_rel_error"] = fit.get("mean_rel_error_absmean")
    models["ptqtp"]["weight_rel_error"] = fit.get("mean_rel_error")
    record = {"source": shown(fp_run), "source_steps": src.train.steps,
              "source_tokens_per_step": src.train.batch_size * src.train.seq_len,
              "command": this, "models": models}
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONVERSION
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Reading the runs


def scratch_runs(study: dict[str, Any], cpu: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Each arm's finished runs (summarize_run) and the run folders that have not finished."""
    from hgf.runs import load_run_config

    preset = load_preset(study["grid"])
    steps = int(study["steps"])
    runs: dict[str, list[dict]] = {}
    unfinished = []
    for arm in study["arms"]:
        for d in sorted((cpu / "runs").glob(f"{arm}-{steps}steps-seed*")):
            try:
                seed = int(d.name.rsplit("seed", 1)[1])
            except ValueError:
                continue
            if not (d / DONE_FILE).is_file():
                unfinished.append(d.name)
                continue
            cfg = (load_run_config(d) if (d / "config.json").is_file()
                   else arm_config(preset, arm, steps, seed, d))
            r = summarize_run(RunSpec(arm, steps, seed, d, cfg))
            if r is not None:
                r["cfg"] = cfg
                runs.setdefault(arm, []).append(r)
    return runs, unfinished


def rows(runs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    out = {}
    for arm, rs in runs.items():
        row: dict[str, Any] = {"n": len(rs), "losses": [r["val_loss"] for r in rs],
                               "diverged": sum(r["diverged"] for r in rs)}
        for k in ("val_loss", "val_bpb"):
            row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
        row["bits"] = stored_bits(rs[0]["cfg"])
        row["correction_bits"] = correction_bits(rs[0]["cfg"])
        row["min_bits"] = min(row["bits"].values())
        out[arm] = row
    fp, bn = out.get("fp16"), out.get("bitnet")
    for arm, row in out.items():
        row["gap"], row["gap_se"] = math.nan, None
        if fp and bn and arm not in ("fp16", "bitnet"):
            row["gap"] = gap_recovery(bn["val_loss"], row["val_loss"], fp["val_loss"])
            row["gap_se"] = gap_recovery_se(bn, row, fp)
    return out


def read_bench(path: Path) -> tuple[dict[tuple[str, str], dict], dict]:
    """{(bench arm, packing): the native/primary decode record} and the bench's env."""
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    recs = data.get("decode_without_peer") or data.get("decode") or []
    out = {(r["arm"], r["packing"]): r for r in recs if r.get("system", "hgf") == "hgf"}
    for r in data.get("decode_reference", []):  # the dense rows (fp16's stand-in)
        out.setdefault((r["arm"], r["packing"]), r)
    return out, data.get("env", {})


def _speed(arm: str, bench: dict[tuple[str, str], dict]) -> str:
    if arm == "fp16":
        recs = [(p, r) for (a, p), r in bench.items() if a.startswith("dense")]
    else:
        recs = [(p, r) for (a, p), r in bench.items() if a == BENCH_ARMS.get(arm)]
    if not recs:
        return "not measured"
    return " · ".join(f"{r['cpu_ms_per_token']:.2f} ({p}"
                      + (", reference path" if r.get("engine") == "reference" else "") + ")"
                      for p, r in recs)


def _pm(x: float, s: float | None, n: int, spec: str = ".4f") -> str:
    if not _finite(x):
        return "—"
    if n < 2 or s is None:
        return f"{x:{spec}} ± ?"
    return f"{x:{spec}} ± {s:{spec}}"


# ---------------------------------------------------------------------------------------------
# Reading paragraph


def _diff_text(a: str, b: str, ra: dict, rb: dict) -> tuple[str, bool | None]:
    d = ra["val_loss"] - rb["val_loss"]
    se2 = twice_se(ra, rb)
    if se2 is None:
        return (f"L_{a} − L_{b} = {d:+.4f} (one seed of an arm: the seed noise is unknown)", None)
    big = abs(d) > se2
    return (f"L_{a} − L_{b} = {d:+.4f}, " + ("larger than" if big else "within")
            + f" twice its standard error ({se2:.4f})", big)


def reading(table: dict[str, dict[str, Any]], conv: dict[str, Any] | None) -> list[str]:
    lines = []
    tern = {a: r for a, r in table.items() if a != "fp16" and _finite(r["val_loss"])}
    if tern:
        best = min(tern, key=lambda a: tern[a]["val_loss"])
        lines.append(f"- Lowest loss of the ternary arms from scratch: **{best}** "
                     f"({tern[best]['val_loss']:.4f}, {tern[best]['min_bits']:.2f} bits per "
                     f"weight as stored at best, n = {tern[best]['n']}).")
        if "bitnet" in tern:
            for a in tern:
                if a != "bitnet":
                    lines.append("  - " + _diff_text(a, "bitnet", tern[a], tern["bitnet"])[0]
                                 + f"; {tern[a]['min_bits']:.2f} vs "
                                 f"{tern['bitnet']['min_bits']:.2f} bits/weight.")
        # an arm is beaten at equal (or fewer) stored bits when another arm storing no more
        # bits has a lower loss by more than twice the standard error of the difference
        beaten, unknown = {}, []
        for a, ra in tern.items():
            for b, rb in tern.items():
                if b == a or rb["min_bits"] > ra["min_bits"] + 1e-9:
                    continue
                if rb["val_loss"] < ra["val_loss"]:
                    _, big = _diff_text(a, b, ra, rb)
                    if big:
                        beaten.setdefault(a, []).append(b)
                    elif big is None:
                        unknown.append((a, b))
        front = [a for a in sorted(tern, key=lambda a: tern[a]["min_bits"]) if a not in beaten]
        lines.append("- At equal or fewer stored bits per weight (each arm's smallest packing): "
                     + (", ".join(f"{a} is beaten by {', '.join(bs)}" for a, bs in beaten.items())
                        + " by more than twice the standard error; " if beaten else
                        "no arm is beaten by more than twice the standard error by an arm "
                        "storing no more bits; ")
                     + "not beaten: " + ", ".join(front) + "."
                     + (" Undecided with one seed: " + ", ".join(f"{b} below {a} at no more bits"
                                                                  for a, b in unknown) + "."
                        if unknown else ""))
    else:
        lines.append("- No finished ternary run of the grid yet.")
    if conv:
        m = conv["models"]
        fp, ptq, pt = m.get("fp"), m.get("absmean_ptq"), m.get("ptqtp")
        if fp and ptq and pt:
            g = gap_recovery(ptq["val_loss"], pt["val_loss"], fp["val_loss"])
            lines.append(
                f"- Without training, PTQTP's loss is {pt['val_loss'] - ptq['val_loss']:+.4f} "
                f"nats against absmean ternarization ({g:.1%} of the absmean gap to the FP source "
                f"recovered; one conversion, no seeds) at {min(pt['stored_bits'].values()):.2f} "
                f"vs {min(ptq['stored_bits'].values()):.2f} stored bits per weight, so it is not "
                "an equal-bits comparison.")
    return lines


# ---------------------------------------------------------------------------------------------
# The report


def render(study: dict[str, Any], cpu: Path, bench_path: Path, conv_path: Path, out: Path
           ) -> tuple[str, dict[str, dict[str, Any]]]:
    steps = int(study["steps"])
    runs, unfinished = scratch_runs(study, cpu)
    table = rows(runs)
    bench, env = read_bench(bench_path)
    conv = json.loads(conv_path.read_text()) if conv_path.is_file() else None
    commits = run_commits(r["dir"] for rs in runs.values() for r in rs)
    cpu_s = shown(cpu)
    bench_s = shown(bench_path)
    lines = ["# The methods side by side (issue 17)", "",
             f"Built by `python -m hgf.reproduce.methods --cpu {cpu_s} --bench {bench_s}` "
             f"(or `hgf reproduce --preset {study['path'].stem} --report-only`) from the runs that "
             f"exist; study: `{shown(study['path'])}`. Losses are the full validation split "
             "(nats/token) after the last step, mean ± std over seeds (`± ?`: one seed, the seed "
             "noise is unknown); gap recovery (L_bitnet − L_arm)/(L_bitnet − L_fp16) ± its "
             "standard error (first order, hgf.reproduce.report.gap_recovery_se). Stored bits: "
             "per ternary projection weight in each packing the model can be stored in "
             "(hgf.kernels.packing), the per-tensor scales, the FP16 correction and gates (hgf "
             "arms) and Tequila's float32 bias included, embeddings excluded (hgf.memory).", ""]
    if commits:
        lines += [commits_line(commits), ""]

    lines += [f"## From scratch on the `{study['grid']}` grid ({steps} steps)", "",
              "| arm | seeds | val loss | bits/byte | gap recovery vs bitnet | stored bits/weight "
              "| of which correction or bias | decode CPU ms/token (native decoder) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    missing = []
    running = {name.rsplit(f"-{steps}steps", 1)[0] for name in unfinished}
    for arm in study["arms"]:
        r = table.get(arm)
        if r is None:
            what = "not finished" if arm in running else "not run"
            missing += [] if arm in running else [arm]
            lines.append(f"| {arm} | 0 | {what} | — | — | — | — | {_speed(arm, bench)} |")
            continue
        gap = ("—" if arm in ("fp16", "bitnet") else _pm(r["gap"], r["gap_se"],
                                                          2 if r["gap_se"] is not None else 1,
                                                          ".3f"))
        corr = f"{r['correction_bits']:.3f}" if r["correction_bits"] else "—"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {arm} | {r['n']}{div} | {_pm(r['val_loss'], r['val_loss_std'], r['n'])} "
                     f"| {_pm(r['val_bpb'], r['val_bpb_std'], r['n'])} | {gap} "
                     f"| {_bits_text(r['bits'])} | {corr} | {_speed(arm, bench)} |")
    lines.append("")
    if unfinished:
        lines += [f"Still running or stopped (no `done.json`): {', '.join(unfinished)}.", ""]
    if missing:
        lines += ["Not run: " + ", ".join(missing) + " — `hgf reproduce --preset "
                  f"{study['grid']} --arms {','.join(missing)} --steps {steps} --seeds 2`.", ""]
    if bench:
        threads = {r.get("threads") for r in bench.values()}
        lines += [f"Decode speed from `{bench_s}`: process CPU ms per token, median over rounds, "
                  f"{'/'.join(str(t) for t in sorted(threads, key=str))} thread(s), batch 1, "
                  "random weights at the bench's model size (`hgf bench infer --size`, default "
                  "base100m: speed depends on the shape, not the values), the same linear and "
                  "attention as each arm (" + ", ".join(f"{a} → {b}" for a, b in BENCH_ARMS.items())
                  + "). Measured by `" + BENCH_COMMAND.format(bench=bench_s) + "`"
                  + (f" on {env.get('cpu', '')}" if env.get("cpu") else "") + ".", ""]
    else:
        lines += [f"Decode speed: not measured (`{bench_s}` does not exist). Command: `"
                  + BENCH_COMMAND.format(bench=bench_s) + "`.", ""]
    lines += ["Commands: `hgf reproduce --preset " + study["grid"] + " --arms fp16,bitnet,hgf,"
              f"hgf_std --steps {steps} --seeds 3` and `hgf reproduce --preset {study['grid']} "
              f"--arms tequila,sherry --steps {steps} --seeds 2` (each run's own command is in "
              f"its `run_info.json` under `{cpu_s}/runs/`).", ""]
    if (out.parent / PLOT).is_file():
        lines += [f"![final losses]({PLOT})", ""]

    lines += ["## Conversion without training", ""]
    if conv:
        m = conv["models"]
        fp = m.get("fp", {})
        lines += [f"Source: `{conv['source']}` ({conv.get('source_steps')} steps of "
                  f"{conv.get('source_tokens_per_step')} tokens), converted by `{conv['command']}`."]
        grid_fp = cpu / study["fp_source"]
        if Path(conv["source"]).name != grid_fp.name:
            kept = (grid_fp / "model.safetensors").is_file()
            lines[-1] += (f" It is not the grid's `{study['fp_source']}`"
                          + ("" if kept else ", whose weights were not kept (its folder holds "
                             "the compact records only)")
                          + f": rerun `--convert {cpu_s}/{study['fp_source']}` "
                          + ("to measure that one." if kept else "once it is retrained with its "
                             "weights."))
        lines += ["", "| model | val loss | Δ vs FP | bits/byte | gap recovery vs absmean "
                  "| ‖W−Ŵ‖²/‖W‖² (mean over projections) | stored bits/weight "
                  "| decode CPU ms/token | command |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        ptq = m.get("absmean_ptq")
        for key in ("fp", "absmean_ptq", "ptqtp"):
            r = m.get(key)
            if r is None:
                lines.append(f"| {key} | not measured | — | — | — | — | — | — | — |")
                continue
            d = r["val_loss"] - fp["val_loss"] if fp else math.nan
            g = (gap_recovery(ptq["val_loss"], r["val_loss"], fp["val_loss"])
                 if key == "ptqtp" and ptq and fp else math.nan)
            lines.append(f"| {r['label']} | {_fmt(r['val_loss'])} | "
                         + ("—" if key == "fp" else f"{d:+.4f}") + f" | {_fmt(r['val_bpb'])} | "
                         + (f"{g:.3f}" if _finite(g) else "—")
                         + f" | {_fmt(r.get('weight_rel_error'))}"
                         + f" | {_bits_text(r['stored_bits'])}"
                         + f" | {'—' if key == 'fp' else _speed(key, bench)} | `{r['command']}`"
                         + (f" ({r['how']})" if r.get("how") else "") + " |")
        lines.append("")
    else:
        lines += [f"Not measured (`{shown(conv_path)}` does not exist). Command: `python -m "
                  f"hgf.reproduce.methods --convert {cpu_s}/{study['fp_source']} --methods-dir "
                  f"{shown(conv_path.parent)}`.", ""]

    lines += finetune_section(study, cpu)
    lines += ["## Reading", "", *reading(table, conv), ""]
    return "\n".join(lines), table


FT_ARMS = ("fp", "fp_ft", "ptq", "ptqtp", "hgf_svd_ptq", "qat_kd", "hgf_svd_kd", "hgf_lora_kd",
           "tequila_kd", "sherry_kd")


def finetune_section(study: dict[str, Any], cpu: Path) -> list[str]:
    """The FP -> ternary setting: the conversion study's presets (``study.convert_presets``), read
    from their ``<cpu>/<preset>.json`` (hgf.reproduce.convert_study.write_report)."""
    lines = ["## From a full-precision model, with equal fine-tuning tokens", "",
             "The conversion study (docs/CONVERT.md): one FP model, then every arm fine-tuned the "
             "same steps from it with distillation (BitNet QAT `qat_kd`, HGF with the residual-SVD "
             "correction, Tequila, Sherry), or converted with no training (absmean `ptq`, PTQTP, "
             "HGF's SVD correction alone). Gap recovery is against `qat_kd` for the trained arms "
             "and `ptq` for the untrained ones, relative to the FP model (for the trained arms, "
             "`fp_ft`, the FP model continued on the same tokens, where the study has it); "
             "bits/weight as stored "
             "(i2; Sherry in its own packing).", ""]
    for preset in study["convert_presets"]:
        path = cpu / f"{preset}.json"
        command = f"hgf reproduce --preset {preset}"
        if not path.is_file():
            lines += [f"Preset `{preset}`: not measured yet (`{command}`, then "
                      f"`{command} --report-only`).", ""]
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        lines += [f"Preset `{preset}` ({data['fp_steps']} FP steps, {data['ft_steps']} fine-tuning "
                  f"steps, {data['seeds']} seeds; `{command}`, full report "
                  f"`{shown(cpu / (preset + '.md'))}`):", "",
                  "| arm | runs | val loss | bits/byte | gap recovery | bits/weight |",
                  "|---|---:|---:|---:|---:|---:|"]
        order = sorted(rows.values(), key=lambda r: (FT_ARMS.index(r["kind"]) if r["kind"]
                                                     in FT_ARMS else len(FT_ARMS), r["arm"]))
        for r in order:
            if r["kind"] not in FT_ARMS:
                continue
            rec = "—"
            if r.get("reference") and _finite(r.get("gap_recovery")):
                rec = f"{r['gap_recovery']:.3f} vs {r['reference']}"
            elif r.get("reference") and _finite(r.get("vs_reference")):  # no gap to recover
                rec = f"— ({r['vs_reference']:+.4f} nats vs {r['reference']}; {r['gap_note']})"
            lines.append(f"| {r['arm']} | {r['n']} | "
                         f"{_pm(r['val_loss'], r.get('val_loss_std'), r['n'])} | "
                         f"{_pm(r['val_bpb'], r.get('val_bpb_std'), r['n'])} | {rec} | "
                         f"{_fmt(r.get('bits_i2'), '.2f')} |")
        lines.append("")
    return lines


def plot(table: dict[str, dict[str, Any]], study: dict[str, Any], path: Path) -> Path | None:
    from hgf.reproduce.plots import plot_final_losses

    items = [(f"{a} ({table[a]['min_bits']:.2f} b/w)", [x for x in table[a]["losses"]
                                                        if _finite(x)])
             for a in study["arms"] if a in table]
    items = [(label, xs) for label, xs in items if xs]
    if not items:
        return None
    bn = table.get("bitnet")
    band = (bn["val_loss"], bn["val_loss_std"]) if bn and _finite(bn["val_loss"]) else None
    return plot_final_losses(items, band, path,
                             f"{study['grid']} grid, {study['steps']} steps: final validation loss")


def write_report(study: dict[str, Any], cpu: Path, bench: Path | None = None,
                 out: Path | None = None, conversion: Path | None = None) -> Path:
    out = out or cpu / REPORT
    bench = bench or cpu / "methods" / "bench_infer.json"
    conversion = conversion or cpu / "methods" / CONVERSION
    out.parent.mkdir(parents=True, exist_ok=True)
    _, table = render(study, cpu, bench, conversion, out)
    with contextlib.suppress(ImportError):  # matplotlib missing: the report without its plot
        plot(table, study, out.parent / PLOT)
    text, _ = render(study, cpu, bench, conversion, out)
    atomic_write_text(out, text)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hgf.reproduce.methods",
                                description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESET, help="the methods study preset")
    p.add_argument("--cpu", type=Path, default=Path("results/cpu"),
                   help="the grid's out folder (its runs/)")
    p.add_argument("--bench", type=Path, help="hgf bench infer --json file (default "
                   "CPU/methods/bench_infer.json)")
    p.add_argument("--methods-dir", type=Path,
                   help="where conversion.json is (default CPU/methods)")
    p.add_argument("--out", type=Path, help="the report (default CPU/methods.md)")
    p.add_argument("--convert", type=Path, metavar="FP_RUN",
                   help="first measure the conversion without training of this FP run")
    args = p.parse_args(argv)

    def body() -> int:
        study = load_study(args.preset)
        methods_dir = args.methods_dir or args.cpu / "methods"
        if args.convert:
            print(f"conversion: {convert(args.convert, methods_dir)}")
        path = write_report(study, args.cpu, args.bench, args.out, methods_dir / CONVERSION)
        print(f"methods report: {path}")
        return 0

    return exit_code(body)  # a bad preset or an unwritable report: one line, status 2


if __name__ == "__main__":
    sys.exit(main())
