"""The full-precision -> 1.58-bit conversion study (docs/CONVERT.md), and its report.

    python -m hgf.reproduce.convert_study --preset convert [--out results/cpu] [--arms ...]
                                          [--seeds N] [--seed-index K] [--report-only]
                                          [--background]

One full-precision model ``fp`` (configs/fp16.toml + the preset, ``study.fp_steps`` steps) is
converted by every arm; the fine-tuning arms all train ``study.ft_steps`` steps of the same batch
(equal fine-tuning tokens) from ``init.from = fp``, once per seed (``train.seed`` + seed index):

    ptq            BitNet with the FP weights ternarized, no training: the post-training loss
    hgf_svd_ptq    HGF with the residual-SVD correction, no training (post-training low-rank
                   error correction, LQER/LoftQ-like), at each rank
    fp_ft          the FP model itself continued on the fine-tune's tokens (CE only): the
                   equal-token control, the FP reference of the fine-tuned arms when present
    qat            BitNet QAT from the FP model (CE only)
    qat_kd         qat + distillation from the FP model ([distill])
    hgf_svd_kd     HGF (standard attention) + correction initialised from the residual SVD
                   (hgf.init = svd) + distillation, at each rank
    hgf_lora_kd    the same with the LoRA init (A Kaiming-uniform, B = 0)
    tequila_kd     Tequila (dead-zone bias, configs/tequila.toml) + distillation (docs/METHODS.md)
    sherry_kd      Sherry (3:4 sparse ternary, Arenas annealed over the fine-tune) + distillation
    ptqtp          PTQTP: two trit-planes with row scales fitted to the FP weights, no training
    scratch        BitNet from random weights for fp_steps + ft_steps steps: the FP model's tokens
                   plus the fine-tune's

Ranks: the largest with the correction (FP16 A, B, gates) at most ``study.overhead`` of the 2-bit
backbone (hgf.model.linear.rank_for_overhead), and ``study.large_rank``.

A preset (``configs/reproduce/<name>.toml``) holds ``[study]`` (fp_steps, ft_steps, seeds, arms,
overhead, large_rank) and config sections: ``[base.*]`` for every run, ``[fp.*]`` the FP model,
``[ft.*]`` every fine-tuning arm, ``[scratch.*]`` the scratch arm, ``[distill]``, ``[init]`` and
``[hgf]`` for the arms that use them. Runs live in ``OUT/<preset>/<arm>-seed<s>``
(``OUT/<preset>/fp`` for the FP model; ``OUT/convert/...`` for the ``convert`` preset); finished
runs (``done.json``) are skipped, interrupted ones resume. The report is ``OUT/<preset>.md`` +
``<preset>.json`` + ``<preset>_curves.png``: each arm's full-validation loss
and bits/byte (mean ± std over seeds), the gap recovered by the HGF/Tequila/Sherry/PTQTP arms
against the FP model, ``(L_ref − L_arm) / (L_ref − L_fp)`` with ref = qat_kd for the trained arms
and ptq for the untrained ones, the correction's memory overhead, the bits per weight as stored,
and the validation-loss curves. L_fp is the source FP model's loss for the untrained arms and, when
the study has ``fp_ft``, that arm's for the fine-tuned ones (equal tokens: the fine-tune's tokens
are extra training the source did not get).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgf.config import Config, ConfigError, build_config, read_toml
from hgf.errors import HGFError, exit_code
from hgf.reproduce.grid import DONE_FILE, RunSpec, configs_dir, resolve_preset
from hgf.reproduce.report import _finite, _mean_std, mean_se
from hgf.runs import MODEL_FILE, atomic_write_text

KINDS = ("ptq", "hgf_svd_ptq", "ptqtp", "fp_ft", "qat", "qat_kd", "hgf_svd_kd", "hgf_lora_kd",
         "tequila_kd", "sherry_kd", "scratch")
ABOUT = {
    "fp": "full-precision model (the source)",
    "fp_ft": "the FP model continued on the fine-tune's tokens (equal-token control)",
    "ptq": "(a) ternarized FP weights, no training",
    "hgf_svd_ptq": "HGF, residual-SVD correction, no training",
    "qat": "(b) BitNet QAT from the FP model",
    "qat_kd": "(c) (b) + distillation",
    "hgf_svd_kd": "(d) HGF + SVD-init correction + distillation",
    "hgf_lora_kd": "(e) HGF + LoRA-init correction + distillation",
    "tequila_kd": "Tequila + distillation",
    "sherry_kd": "Sherry (1.25 bits/weight) + distillation",
    "ptqtp": "PTQTP (two trit-planes), no training",
    "scratch": "(f) BitNet from scratch, FP + fine-tune tokens",
}
NO_TRAINING = ("ptq", "hgf_svd_ptq", "ptqtp")
# the arm config file (configs/<name>.toml) of a kind; the others: bitnet, or hgf_std for hgf_*
ARM_FILE = {"fp_ft": "fp16", "tequila_kd": "tequila", "sherry_kd": "sherry"}
RANKED = ("hgf_svd_ptq", "hgf_svd_kd", "hgf_lora_kd")
SECTIONS = ("base", "fp", "ft", "scratch", "distill", "init", "hgf")
# a preset's runs live in OUT/<preset name>/, its report in OUT/<preset name>.md, .json and
# _curves.png (the `convert` preset: OUT/convert/, OUT/convert.md, ...)
DEFAULT_NAME = "convert"
RESULT_FILE = "result.json"  # the no-training arms' evaluation


@dataclass
class Study:
    name: str
    path: Path
    fp_steps: int
    ft_steps: int
    seeds: int
    kinds: list[str]
    overhead: float
    large_rank: int
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_study(name_or_path: str) -> Study:
    path = resolve_preset(name_or_path)
    d = read_toml(path)
    unknown = set(d) - {"study", *SECTIONS}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)} (known: study, "
                          f"{', '.join(SECTIONS)})")
    s = d.get("study", {})
    bad = set(s) - {"fp_steps", "ft_steps", "seeds", "arms", "overhead", "large_rank"}
    if bad:
        raise ConfigError(f"{path}: unknown key study.{sorted(bad)[0]}")
    kinds = list(s.get("arms", KINDS))
    for k in kinds:
        if k not in KINDS:
            raise ConfigError(f"{path}: study.arms: unknown arm {k!r} (known: {', '.join(KINDS)})")
    study = Study(name=path.stem, path=path, fp_steps=int(s.get("fp_steps", 4000)),
                  ft_steps=int(s.get("ft_steps", 1000)), seeds=int(s.get("seeds", 2)),
                  kinds=kinds, overhead=float(s.get("overhead", 0.15)),
                  large_rank=int(s.get("large_rank", 16)),
                  sections={k: d.get(k, {}) for k in SECTIONS})
    for key in ("fp_steps", "ft_steps", "seeds", "large_rank"):
        if getattr(study, key) <= 0:
            raise ConfigError(f"{path}: study.{key} must be > 0")
    fp_config(study, Path("validate"))  # fail early on a bad section
    return study


# ---------------------------------------------------------------------------------------------
# Configs


def _arm_file(name: str) -> tuple[dict[str, Any], str]:
    p = configs_dir() / f"{name}.toml"
    return read_toml(p), str(p)


def _seed(study: Study, index: int) -> int:
    return int(study.sections["base"].get("train", {}).get("seed", Config().train.seed)) + index


def fp_dir(out: Path, name: str = DEFAULT_NAME) -> Path:
    return out / name / "fp"


def fp_config(study: Study, out: Path) -> Config:
    s, where = study.sections, str(study.path)
    return build_config(_arm_file("fp16"), (s["base"], f"{where} [base]"),
                        (s["fp"], f"{where} [fp]"),
                        ({"train": {"steps": study.fp_steps, "seed": _seed(study, 0),
                                    "out_dir": str(fp_dir(out, study.name))}}, "convert study"))


def scratch_config(study: Study, out: Path, seed: int) -> Config:
    s, where = study.sections, str(study.path)
    steps = study.fp_steps + study.ft_steps
    return build_config(_arm_file("bitnet"), (s["base"], f"{where} [base]"),
                        (s["scratch"], f"{where} [scratch]"),
                        ({"train": {"steps": steps, "seed": _seed(study, seed),
                                    "out_dir": str(run_dir(out, "scratch", seed, study.name))}},
                         "convert study"))


def ft_config(study: Study, out: Path, kind: str, seed: int, rank: int | None = None) -> Config:
    """A fine-tuning (or no-training) arm initialised from the FP run (which must exist)."""
    from hgf.train.init_from import build_train_config

    s, where = study.sections, str(study.path)
    hgf = kind.startswith("hgf")
    arm_file = ARM_FILE.get(kind, "hgf_std" if hgf else "bitnet")
    layers = [_arm_file(arm_file), (s["base"], f"{where} [base]"),
              (s["ft"], f"{where} [ft]"), ({"init": s["init"]}, f"{where} [init]")]
    if hgf:
        init = "kaiming" if kind == "hgf_lora_kd" else "svd"
        layers += [({"hgf": s["hgf"]}, f"{where} [hgf]"),
                   ({"hgf": {"rank": rank, "target_overhead": 0.0, "init": init}}, kind)]
    if kind.endswith("_kd"):
        layers.append(({"distill": s["distill"]}, f"{where} [distill]"))
    steps = study.ft_steps
    layers.append(({"train": {"steps": steps, "seed": _seed(study, seed),
                              "out_dir": str(run_dir(out, arm_name(kind, rank), seed, study.name))},
                    "init": {"from": str(fp_dir(out, study.name))}}, "convert study"))
    return build_train_config(*layers)


def arm_name(kind: str, rank: int | None = None) -> str:
    return f"{kind}_r{rank}" if rank is not None else kind


def run_dir(out: Path, arm: str, seed: int, name: str = DEFAULT_NAME) -> Path:
    return out / name / f"{arm}-seed{seed}"


def ranks(study: Study, out: Path) -> list[int]:
    """The overhead-bound rank and the large rank, for the FP model's architecture."""
    from hgf.model.linear import rank_for_overhead

    cfg = ft_config(study, out, "hgf_svd_kd", 0, rank=1)
    small = rank_for_overhead(cfg, study.overhead, bits=2.0)
    return sorted({small, study.large_rank})


def plan_arms(study: Study, out: Path, kinds: list[str] | None = None,
              seeds: int | None = None,
              seed_index: int | None = None) -> list[tuple[str, str, int, int | None]]:
    """(kind, arm name, seed index, rank) of every run after the FP model, in running order:
    no-training arms, then the fine-tuning arms seed by seed, then scratch; only seed
    ``seed_index``'s runs when it is given, inside ``seeds`` or beyond it (an extra seed, as
    ``hgf reproduce --seed-index`` for a grid; the no-training arms are seed 0's)."""
    kinds = kinds or study.kinds
    seeds = seeds if seeds is not None else study.seeds
    if seed_index is not None:
        seeds = max(seeds, seed_index + 1)
    rs = ranks(study, out) if any(k in RANKED for k in kinds) else []
    out_list = []
    for k in (k for k in kinds if k in NO_TRAINING):
        for r in (rs if k in RANKED else [None]):
            out_list.append((k, arm_name(k, r), 0, r))
    for s in range(seeds):
        for k in (k for k in kinds if k not in NO_TRAINING + ("scratch",)):
            for r in (rs if k in RANKED else [None]):
                out_list.append((k, arm_name(k, r), s, r))
    if "scratch" in kinds:
        out_list += [("scratch", "scratch", s, None) for s in range(seeds)]
    if seed_index is not None:
        out_list = [run for run in out_list if run[2] == seed_index]
    return out_list


# ---------------------------------------------------------------------------------------------
# Running


def evaluate_without_training(cfg: Config, out_dir: Path, kind: str = "ptq") -> dict[str, Any]:
    """The no-training arms: the initialised (``ptq``, ``hgf_svd_ptq``) or PTQTP-converted
    (``ptqtp``: hgf.hf.ptqtp_convert, the config's ``init.from`` being the FP run) model's full
    validation (docs/METHOD.md's bits/byte), written as ``result.json`` and a one-record
    metrics.jsonl."""
    import torch

    from hgf.config import replace
    from hgf.data import prepare
    from hgf.model import build_model
    from hgf.train.device import autocast_for, resolve_device
    from hgf.train.evaluate import evaluate_tokens
    from hgf.train.init_from import model_initialiser

    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = prepare(cfg, progress=False)
    if kind == "ptqtp":
        from hgf.hf.ptqtp_convert import convert_model
        from hgf.runs import load_trained

        source, source_cfg = load_trained(cfg.init.from_)
        model, conv_cfg, info = convert_model(source, source_cfg, src=str(cfg.init.from_))
        info = {k: v for k, v in info.items() if k != "layers"}
        model = model.to(device)
        conv = conv_cfg.to_dict()
        cfg = replace(cfg, model=conv["model"], ptqtp=conv["ptqtp"])
    else:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, device)
        init = model_initialiser(cfg, data.tokens("train"), device, note=False)
        info = init(model)
        info = {k: v for k, v in info.items() if k != "subln"}
    res = evaluate_tokens(model, data.tokens("valid"), cfg.train.seq_len, cfg.train.batch_size,
                          device, data.bytes_per_token("valid"),
                          autocast_for(device, cfg.train.dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"kind": "final", "step": 0, **res.to_dict()}
    atomic_write_text(out_dir / "metrics.jsonl", json.dumps(record) + "\n")
    atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    result = {**record, "init" if kind != "ptqtp" else "ptqtp": info}
    atomic_write_text(out_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _run_one(label: str, d: Path, kind: str, arm: str, seed: int, make_cfg) -> None:
    from hgf.reproduce.runner import run_specs

    if (d / DONE_FILE).is_file():
        print(f"{label}: done already ({d})", flush=True)
        return
    cfg = make_cfg()
    if kind in NO_TRAINING:
        print(f"{label} -> {d}", flush=True)
        t0 = time.time()
        evaluate_without_training(cfg, d, kind)
        status = {"status": "ok", "message": "", "arm": arm, "steps": 0, "seed_index": seed,
                  "lr": cfg.train.lr, "wall_s": round(time.time() - t0, 1)}
        atomic_write_text(d / DONE_FILE, json.dumps(status, indent=2) + "\n")
        return
    print(label, flush=True)
    run_specs([RunSpec(arm, cfg.train.steps, seed, d, cfg)])


def run_study(study: Study, out: Path, kinds: list[str] | None = None,
              seeds: int | None = None, seed_index: int | None = None) -> None:
    """Train (or skip, or resume) every run of the study in order (only seed ``seed_index``'s,
    when given): the FP model first unless only the scratch arm is asked for (it does not need
    it)."""
    needs_fp = any(k != "scratch" for k in kinds or study.kinds)
    fp = fp_dir(out, study.name)
    if needs_fp:
        _run_one("[fp] full-precision model", fp, "fp", "fp", 0, lambda: fp_config(study, out))
    plan = plan_arms(study, out, kinds, seeds, seed_index)  # the ranks need the FP model's config
    if needs_fp:
        pending = [arm for kind, arm, s, _ in plan
                   if kind != "scratch" and not (run_dir(out, arm, s, study.name) / DONE_FILE).is_file()]
        if pending and not (fp / MODEL_FILE).is_file():
            raise HGFError(f"{fp}: the FP model is finished (done.json) but its weights "
                           f"({MODEL_FILE}, not kept in git) are missing, and {pending[0]} needs "
                           f"them: move {fp} aside to retrain it (every arm then needs a rerun "
                           "from the new model: floats differ across machines)")
    for i, (kind, arm, seed, rank) in enumerate(plan, 1):
        d = run_dir(out, arm, seed, study.name)
        label = f"[{i}/{len(plan)}] {arm} seed {seed}"
        if kind == "scratch":
            _run_one(label, d, kind, arm, seed, lambda s=seed: scratch_config(study, out, s))
        else:
            _run_one(label, d, kind, arm, seed,
                     lambda k=kind, s=seed, r=rank: ft_config(study, out, k, s, r))


# ---------------------------------------------------------------------------------------------
# Report


def _summary(d: Path) -> dict[str, Any] | None:
    from hgf.train.metrics import read_metrics

    if not (d / DONE_FILE).is_file():
        return None
    status = json.loads((d / DONE_FILE).read_text(encoding="utf-8"))
    recs = read_metrics(d)
    final = next((r for r in reversed(recs) if r.get("kind") == "final"), None)
    evals = [r for r in recs if r.get("kind") == "eval" and _finite(r.get("val_loss"))]
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    return {
        "dir": str(d), "status": status["status"], "seed_index": status.get("seed_index", 0),
        "steps": status.get("steps", 0), "wall_s": status.get("wall_s"),
        "val_loss": final["val_loss"] if final else math.nan,
        "val_bpb": final["val_bpb"] if final else math.nan,
        "val_curve": [(r["step"], r["val_loss"]) for r in evals],
        "tokens_per_step": cfg["train"]["batch_size"] * cfg["train"]["seq_len"]
        * cfg["train"]["grad_accum"],
        "config": cfg,
    }


def _overhead(cfg_dict: dict[str, Any]) -> dict[str, float] | None:
    from hgf.config import config_from_dict
    from hgf.memory import report_for_config

    cfg = config_from_dict(cfg_dict)
    if cfg.model.linear != "hgf":
        return None
    rep = report_for_config(cfg)
    return {"rank": cfg.hgf.rank, "overhead_i2": rep.overhead("i2"),
            "overhead_i2_with_embeddings": rep.overhead("i2", True),
            "correction_bytes": rep.correction_bytes, "backbone_bytes_i2": rep.backbone_bytes("i2")}


def _stored_bits_i2(cfg_dict: dict[str, Any]) -> float:
    """Bits per projection weight as stored with the i2 packing (sherry: its own packing), with
    the correction, gates, Tequila's bias and PTQTP's row scales (hgf.reproduce.methods)."""
    from hgf.config import config_from_dict
    from hgf.reproduce.methods import FP_BITS, ptqtp_stored_bits, stored_bits

    cfg = config_from_dict(cfg_dict)
    if cfg.model.linear == "dense":
        return FP_BITS
    bits = ptqtp_stored_bits(cfg) if cfg.model.linear == "ptqtp" else stored_bits(cfg)
    return bits.get("sherry" if cfg.model.linear == "sherry" else "i2", math.nan)


def collect(out: Path, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Every finished run under ``OUT/convert``, grouped by arm."""
    arms: dict[str, list[dict[str, Any]]] = {}
    root = out / name
    for done in sorted(root.glob(f"*/{DONE_FILE}")):
        d = done.parent
        arm = "fp" if d.name == "fp" else d.name.rsplit("-seed", 1)[0]
        s = _summary(d)
        if s is not None:
            arms.setdefault(arm, []).append(s)
    rows: dict[str, dict[str, Any]] = {}
    for arm, runs in arms.items():
        kind = arm.rsplit("_r", 1)[0] if arm.startswith("hgf") else arm
        row = {"arm": arm, "kind": kind, "about": ABOUT.get(kind, ""), "n": len(runs),
               "steps": runs[0]["steps"], "tokens": runs[0]["steps"] * runs[0]["tokens_per_step"],
               "wall_s": sum(r["wall_s"] or 0 for r in runs),
               "diverged": sum(r["status"] != "ok" for r in runs),
               "losses": [r["val_loss"] for r in runs]}
        for k in ("val_loss", "val_bpb"):
            row[k], row[k + "_std"] = _mean_std([r[k] for r in runs])
        row["memory"] = _overhead(runs[0]["config"])
        row["bits_i2"] = _stored_bits_i2(runs[0]["config"])
        row["curve"] = next((r["val_curve"] for r in runs if r["seed_index"] == 0), [])
        rows[arm] = row
    for row in rows.values():
        fp = fp_reference(row, rows)
        row["fp_reference"] = fp["arm"] if fp else None
        row["gap_to_fp"], row["gap_to_fp_se"] = gap_to(row, fp) if fp else (math.nan, math.nan)
        against_reference(row, rows.get(REFERENCE.get(row["kind"], "")), fp)
    return {"rows": rows, "fp_loss": rows.get("fp", {}).get("val_loss", math.nan)}


def gap_to(row: dict[str, Any], fp: dict[str, Any]) -> tuple[float, float]:
    """L_row − L_fp and its standard error (the two rows' seed noise, independent)."""
    return row["val_loss"] - fp["val_loss"], math.hypot(mean_se(row), mean_se(fp))


def fp_reference(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The FP row an arm is measured against: the source model ``fp`` for itself, ``fp_ft`` and the
    untrained arms; for the trained ones (fine-tuned, scratch) ``fp_ft`` when the study has it,
    the FP model on the same tokens (else the source, which saw fewer)."""
    if row["kind"] in ("fp", "fp_ft", *NO_TRAINING):
        return rows.get("fp")
    return rows.get("fp_ft", rows.get("fp"))


def against_reference(row: dict[str, Any], ref: dict[str, Any] | None,
                      fp: dict[str, Any] | None) -> None:
    """An arm against its reference (qat_kd for the trained HGF, Tequila and Sherry arms, ptq
    for the untrained HGF and PTQTP ones): ``vs_reference`` = L_ref − L_arm (> 0: the arm is
    better) ± ``vs_reference_se``, and ``gap_recovery`` = that / (L_ref − L_fp), ``fp`` the row
    of :func:`fp_reference`, only where the reference's gap to it exceeds twice that gap's
    standard error; otherwise there is no gap to recover (``gap_note`` says why) and the ratio,
    whose denominator is noise, is NaN."""
    row["reference"] = ref["arm"] if ref else None
    row["vs_reference"] = row["vs_reference_se"] = row["gap_recovery"] = math.nan
    row["gap_note"] = ""
    if ref is None:
        return
    row["vs_reference"] = ref["val_loss"] - row["val_loss"]
    row["vs_reference_se"] = math.hypot(mean_se(ref), mean_se(row))
    if fp is None:
        return
    den, den_se = gap_to(ref, fp)
    if _finite(den) and den > 2 * den_se:
        row["gap_recovery"] = row["vs_reference"] / den
    elif _finite(den):
        row["gap_note"] = (f"no gap: {ref['arm']} is {'below' if den < 0 else 'within 2 SE of'} "
                           f"{FP_NAME.get(fp['arm'], fp['arm'])}")


FP_NAME = {"fp": "the FP model", "fp_ft": "the FP model continued on the same tokens"}


REFERENCE = {"hgf_svd_kd": "qat_kd", "hgf_lora_kd": "qat_kd", "tequila_kd": "qat_kd",
             "sherry_kd": "qat_kd", "hgf_svd_ptq": "ptq", "ptqtp": "ptq"}
ORDER = ("fp", "fp_ft", "ptq", "hgf_svd_ptq", "ptqtp", "qat", "qat_kd", "hgf_svd_kd", "hgf_lora_kd",
         "tequila_kd", "sherry_kd", "scratch")


def _sorted_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r):
        rank = r["memory"]["rank"] if r["memory"] else 0
        return (ORDER.index(r["kind"]) if r["kind"] in ORDER else len(ORDER), rank)
    return sorted(rows.values(), key=key)


def _fmt(x: float, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if _finite(x) else "–"


def plot_curves(data: dict[str, Any], path: Path) -> Path | None:
    """Validation loss on the fixed evaluation subset vs step: the fine-tuning arms (seed 0) with
    the FP model's last loss on the same subset as a line (the no-training arms' losses, far
    above, are in the table); the scratch arm and the FP model against tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = _sorted_rows(data["rows"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10").colors
    i = 0
    for r in rows:
        if r["kind"] in ("fp", "scratch") or not r["curve"]:
            continue
        xs, ys = zip(*r["curve"], strict=True)
        left.plot(xs, ys, color=colors[i % 10], label=r["arm"])
        i += 1
    fp = data["rows"].get("fp")
    if fp and fp["curve"]:  # the same subset as the curves: comparable
        left.axhline(fp["curve"][-1][1], ls=":", color="k", lw=1)
        left.text(1.0, fp["curve"][-1][1], "FP model, end of its training", fontsize=7,
                  ha="right", va="bottom", transform=left.get_yaxis_transform())
    left.set_xlabel("fine-tuning step")
    left.set_ylabel("validation loss, evaluation subset (nats/token)")
    left.set_title("Conversion arms (seed 0)")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:  # no curve yet: no legend
        left.legend(fontsize=7)
    for name, color in (("fp", "k"), ("scratch", colors[3])):
        r = data["rows"].get(name)
        if r and r["curve"]:
            tps = r["tokens"] / max(r["steps"], 1)
            xs, ys = zip(*r["curve"], strict=True)
            right.plot([x * tps / 1e6 for x in xs], ys, color=color, label=name)
    right.set_xlabel("training tokens (millions)")
    right.set_title("From scratch: FP model and BitNet (seed 0)")
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:  # no curve yet: no legend
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def findings(data: dict[str, Any], study: Study) -> list[str]:
    """The report's "What it shows": the measured answers, in words, to the study's questions
    (the ternary gap with and without training; whether the correction pays, judged on its
    difference from the reference beyond twice the standard error at the overhead-bound rank)."""
    rows = data["rows"]
    fp = rows.get("fp")
    if fp is None:
        return []
    out = ["", "## What it shows", ""]

    def gap(name: str) -> str:
        r = rows[name]
        se = f" ± {r['gap_to_fp_se']:.4f}" if r["gap_to_fp_se"] > 0 else ""
        return f"{name} {r['gap_to_fp']:+.4f}{se}"

    def corrected(kind: str) -> list[dict[str, Any]]:
        return sorted((r for r in rows.values() if r["kind"] == kind and r["memory"]),
                      key=lambda r: r["memory"]["rank"])

    def vs(r: dict[str, Any]) -> str:
        se = f" ± {r['vs_reference_se']:.4f}" if r["vs_reference_se"] > 0 else ""
        rec = f", {r['gap_recovery']:.0%} of the gap" if _finite(r["gap_recovery"]) else ""
        return (f"{r['arm']} {r['vs_reference']:+.4f}{se} nats{rec} at "
                f"{r['memory']['overhead_i2']:.0%} memory")

    if "ptq" in rows:
        line = f"- **Without training** the ternarized FP model is {gap('ptq')} nats from it"
        svd = corrected("hgf_svd_ptq")
        if svd:
            line += "; the residual-SVD correction: " + "; ".join(vs(r) for r in svd)
        if "ptqtp" in rows:
            r = rows["ptqtp"]
            line += (f"; PTQTP's two trit-planes {r['vs_reference']:+.4f} nats at "
                     f"{r['bits_i2']:.2f} bits/weight")
        out.append(line + ".")
    control = rows.get("fp_ft")
    if control:
        out.append(f"- **The FP model continued on the fine-tune's tokens** (fp_ft, the "
                   f"equal-token control): {gap('fp_ft')} nats from the source; the fine-tuned "
                   "arms below are measured against it.")
    trained = [n for n in ("qat", "qat_kd", "scratch") if n in rows]
    if trained:
        against = ("the FP model continued on the same tokens" if control else "the FP model")
        out.append(f"- **Fine-tuned ({study.ft_steps} steps)**, the ternary models' distance to "
                   f"{against} (nats, ± standard error): " + ", ".join(gap(n) for n in trained)
                   + (" (scratch: trained from random weights on the same total tokens)"
                      if "scratch" in trained else "") + ".")
    ref = rows.get("qat_kd")
    hgf = corrected("hgf_svd_kd") + corrected("hgf_lora_kd")
    if ref and hgf:
        if ref["gap_to_fp"] <= 2 * ref["gap_to_fp_se"]:
            out.append(f"- QAT with distillation is not above {FP_NAME[ref['fp_reference']]} by "
                       "more than twice its standard error: at this scale there is no ternary gap "
                       "left after the fine-tune, and a gap-recovery ratio would divide by noise."
                       + ("" if control else " (The fine-tune's tokens are extra training the FP "
                          "model did not get; this study has no FP model continued on them.)"))
        out.append("- **The correction against QAT + distillation** (> 0: lower loss): "
                   + "; ".join(vs(r) for r in hgf) + ".")
        bound = [r for r in hgf if r["memory"]["overhead_i2"] <= study.overhead + 1e-9]
        pays = [r for r in bound
                if r["vs_reference"] > 2 * r["vs_reference_se"] and r["vs_reference"] > 0]
        if pays:
            best = max(pays, key=lambda r: r["vs_reference"])
            out.append(f"- **Does the correction pay here? Yes**: within "
                       f"{study.overhead:.0%} of the backbone's memory, {vs(best)}, beyond twice "
                       f"its standard error ({best['vs_reference'] / ref['val_loss']:.2%} of "
                       "QAT + distillation's loss).")
        elif bound:
            out.append(f"- **Does the correction pay here? No**: within {study.overhead:.0%} of "
                       "the backbone's memory no corrected arm beats QAT + distillation by twice "
                       "its standard error.")
        else:
            small = min(hgf, key=lambda r: r["memory"]["overhead_i2"])["memory"]
            out.append(f"- **Does the correction pay here? Not within {study.overhead:.0%} of the "
                       f"backbone's memory**: at this width even rank {small['rank']} costs "
                       f"{small['overhead_i2']:.0%}.")
    return out


def _provenance(root: Path) -> list[str]:
    """Where the trained runs ran (device, torch) and on which code, from their run_info.json."""
    from hgf.reproduce.report import commits_line, run_commits

    dirs = sorted(f.parent for f in root.glob("*/run_info.json"))
    if not dirs:
        return []
    where: dict[str, int] = {}
    for d in dirs:
        info = json.loads((d / "run_info.json").read_text(encoding="utf-8"))
        hw = info.get("hardware", {})
        name = (f"{hw.get('gpu') or hw.get('cpu') or 'unknown'} ({hw.get('device', '?')}, torch "
                f"{info.get('versions', {}).get('torch', '?')})")
        where[name] = where.get(name, 0) + 1
    return ["", "Trained runs made on: " + ", ".join(f"{k}: {n}" for k, n in where.items())
            + " (each run's run_info.json).", "", commits_line(run_commits(dirs)).rstrip(".") + "."]


def write_report(study: Study, out: Path, preset: str | None = None) -> Path:
    data = collect(out, study.name)
    json_file, plot_file = f"{study.name}.json", f"{study.name}_curves.png"
    rows = _sorted_rows(data["rows"])
    atomic_write_text(out / json_file, json.dumps(
        {"study": study.name, "preset": str(study.path), "fp_steps": study.fp_steps,
         "ft_steps": study.ft_steps, "seeds": study.seeds, **data},
        indent=1, default=str) + "\n")
    plot = plot_curves(data, out / plot_file)
    fp = data["rows"].get("fp")
    lines = [f"# From a full-precision model to 1.58 bits (preset `{study.name}`)", ""]
    if fp:
        cfg = json.loads((fp_dir(out, study.name) / "config.json").read_text(encoding="utf-8"))
        m, t = cfg["model"], cfg["train"]
        lines += [
            f"Source: hgf's own full-precision model, size `{m['size']}` (d_model {m['d_model']}, "
            f"{m['n_layers']} layers, {m['n_heads']} heads, d_ff {m['d_ff']}, vocabulary "
            f"{m['vocab_size']}), trained {study.fp_steps} steps of {t['batch_size']} × "
            f"{t['seq_len']} × {t['grad_accum']} tokens on `{cfg['data']['path'] or 'TinyStories'}`.",
            f"Every fine-tuning arm trains {study.ft_steps} steps of the same batch (equal "
            f"fine-tuning tokens) from it; seeds: {study.seeds} (the FP model is one run); the "
            "scratch arm trains the FP model's steps plus the fine-tune's.", ""]
    lines += ["Losses are full-validation nats/token (mean ± std over seeds); bits/byte is "
              "tokenizer-independent. Gap to FP = L_arm − L_FP, the FP model being the source "
              "for the untrained arms and fp_ft"
              + (" (the source continued on the fine-tune's tokens)" if "fp_ft" in data["rows"]
                 else " (not in this study: the source instead)")
              + " for the trained ones. Against the reference = L_ref − L_arm ± its standard "
              "error (> 0: better than the reference), the reference being qat_kd (c) for the "
              "trained HGF, Tequila and Sherry arms and ptq (a) for the untrained HGF and PTQTP "
              "arms. Gap recovered = (L_ref − L_arm) / (L_ref − L_fp), shown only where the "
              "reference's gap to the FP model exceeds twice its standard error (– where it does "
              "not: no gap to recover). Overhead = FP16 correction + gates / the 2-bit packed "
              "backbone (hgf.memory).", "",
              "Bits/weight = the projections as stored (i2; Sherry in its 1.25-bit packing) "
              "with everything beside the backbone.", "",
              "| arm | what | runs | steps | loss | bits/byte | gap to FP | against the reference "
              "| gap recovered | overhead (i2) | bits/weight |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = _fmt(r["val_loss"]) + (f" ± {r['val_loss_std']:.4f}" if r["n"] > 1 else "")
        bpb = _fmt(r["val_bpb"]) + (f" ± {r['val_bpb_std']:.4f}" if r["n"] > 1 else "")
        rec = (f"{r['gap_recovery']:.1%}" if _finite(r["gap_recovery"])
               else "–" if r["gap_note"] else "")
        vs = ""
        if r["reference"] and _finite(r["vs_reference"]):
            se = f" ± {r['vs_reference_se']:.4f}" if r["vs_reference_se"] > 0 else ""
            vs = f"{r['vs_reference']:+.4f}{se} vs {r['reference']}"
        mem = r["memory"]
        over = f"r={mem['rank']}: {mem['overhead_i2']:.1%}" if mem else ""
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        gap = _fmt(r["gap_to_fp"]) if r["kind"] != "fp" else ""
        lines.append(f"| {r['arm']} | {r['about']}{div} | {r['n']} | {r['steps']} | {loss} | "
                     f"{bpb} | {gap} | {vs} | {rec} | {over} | {_fmt(r['bits_i2'], 2)} |")
    if not rows:
        lines.append("| (no finished run yet) | | | | | | | | | | |")
    lines += findings(data, study)
    lines += _provenance(out / study.name)
    if plot is not None:
        lines += ["", f"![validation loss curves]({plot_file})"]
    run = f"python -m hgf.reproduce.convert_study --preset {preset or study.name} --out {out}"
    lines += ["", "Commands (docs/CONVERT.md has the split over two processes; on a GPU, "
              "`PARTS=convert bash scripts/gpu_check.sh` runs one process per arm and seed, in "
              "float32 as on the CPU):", "", f"    {run}", f"    {run} --report-only", ""]
    path = out / f"{study.name}.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hgf.reproduce.convert_study",
                                description="The FP -> 1.58-bit conversion study and its report "
                                "(docs/CONVERT.md).")
    p.add_argument("--preset", default="convert", help="a preset name under configs/reproduce "
                   "or a TOML path (default: convert)")
    p.add_argument("--out", default="results/cpu", help="output folder (runs in OUT/convert, "
                   "the report OUT/convert.md; default results/cpu)")
    p.add_argument("--arms", type=lambda s: s.split(","),
                   help=f"comma-separated subset of {', '.join(KINDS)} (the FP model runs first "
                   "unless only scratch is asked for)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the preset's)")
    p.add_argument("--seed-index", type=int, metavar="K",
                   help="run only seed K's runs (0-based, also past --seeds: an extra seed; one "
                   "process per seed; the no-training arms are seed 0's)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")
    p.add_argument("--background", action="store_true",
                   help="run detached; progress goes to OUT/convert.log")
    args = p.parse_args(argv)
    return exit_code(lambda: _study(args, argv))


def _study(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``main``'s body: run the study's missing arms (unless --report-only), write the report."""
    study = load_study(args.preset)
    out = Path(args.out)
    if args.arms:
        bad = [a for a in args.arms if a not in KINDS]
        if bad:
            raise HGFError(f"--arms: unknown arm {bad[0]!r} (known: {', '.join(KINDS)})")
    if args.seed_index is not None and args.seed_index < 0:
        raise HGFError(f"--seed-index must be >= 0, got {args.seed_index}")
    if args.background:
        from hgf.commands.reproduce import detach

        return detach(out, sys.argv[1:] if argv is None else argv,
                      "hgf.reproduce.convert_study", "convert.log")
    if not args.report_only:
        run_study(study, out, args.arms, args.seeds, args.seed_index)
    print(f"report: {write_report(study, out, args.preset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
