"""The reproduction grid: arms × step regimes × seeds, each a separate training run.

A reproduce preset (``configs/reproduce/<name>.toml``) is data:

    [grid]      arms, steps (one run per regime: the schedule ends at the regime's last step),
                seeds, lr_sweep (candidate LRs for ``--sweep``), sweep_steps
    [lr]        the chosen learning rate per arm (from the sweep)
    [base.*]    config sections applied to every arm (model size, data, train, eval, hgf)
    [arm.NAME.*] config sections for one arm only
    [variant.NAME] a named change to one arm, run by ``hgf reproduce --variants``: ``arm`` (the
                arm it changes), ``about`` (one line: the question it asks) and config sections
    [study]     optional: the question the runs answer (hypothesis, prediction, verdict rule),
                read by :mod:`hgf.reproduce.why`; a preset with ``[study]`` and no ``[grid]`` is
                the conversion study (:mod:`hgf.reproduce.convert_study`), or with
                ``name = "methods"`` the methods report (:mod:`hgf.reproduce.methods`)

An arm's config is, lowest to highest: defaults < ``configs/<arm>.toml`` < ``[base]`` <
``[arm.NAME]`` < ``[lr]`` < the run's steps/seed/out_dir. A variant's sections come after
``[lr]`` (so a variant may change the LR) and before the run's steps/seed/out_dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hgf
from hgf.config import ARMS, Config, ConfigError, build_config, read_toml

DONE_FILE = "done.json"


def configs_dir() -> Path:
    """``configs/`` of the working directory if present, else of the source checkout."""
    local = Path("configs")
    return local if local.is_dir() else Path(hgf.__file__).resolve().parents[2] / "configs"


def resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml":
        if not p.is_file():
            raise ConfigError(f"{p}: reproduce preset not found")
        return p
    p = configs_dir() / "reproduce" / f"{name_or_path}.toml"
    if not p.is_file():
        known = sorted(q.stem for q in p.parent.glob("*.toml"))
        raise ConfigError(f"unknown reproduce preset {name_or_path!r} (known: {', '.join(known)})")
    return p


@dataclass
class Preset:
    name: str
    path: Path
    arms: list[str]
    steps: list[int]
    seeds: int
    base: dict[str, Any]
    arm_overrides: dict[str, dict[str, Any]]
    lr: dict[str, float]
    lr_sweep: list[float] = field(default_factory=list)
    sweep_steps: int = 0
    variants: dict[str, Variant] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)  # [study]: read by hgf.reproduce.why
    # ``--section.key=value`` from the command line: over every run's config, after the variant
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variant:
    name: str
    arm: str
    about: str
    sections: dict[str, Any]


def load_preset(name_or_path: str, overrides: dict[str, Any] | None = None) -> Preset:
    """The preset; ``overrides`` (nested, from ``--section.key=value``) apply to every run."""
    path = resolve_preset(name_or_path)
    d = read_toml(path)
    unknown = set(d) - {"grid", "lr", "base", "arm", "variant", "study"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)} "
                          "(known: grid, lr, base, arm, variant, study)")
    grid = d.get("grid", {})
    bad = set(grid) - {"arms", "steps", "seeds", "lr_sweep", "sweep_steps"}
    if bad:
        raise ConfigError(f"{path}: unknown key grid.{sorted(bad)[0]}")
    arms = list(grid.get("arms", ARMS))
    for a in arms:
        if a not in ARMS:
            raise ConfigError(f"{path}: grid.arms: unknown arm {a!r} (known: {', '.join(ARMS)})")
    steps = [int(s) for s in grid.get("steps", [2500, 3500])]
    if not steps or min(steps) <= 0:
        raise ConfigError(f"{path}: grid.steps must be positive step counts")
    preset = Preset(
        name=path.stem, path=path, arms=arms, steps=steps, seeds=int(grid.get("seeds", 1)),
        base=d.get("base", {}), arm_overrides=d.get("arm", {}),
        lr={k: float(v) for k, v in d.get("lr", {}).items()},
        lr_sweep=[float(x) for x in grid.get("lr_sweep", [])],
        sweep_steps=int(grid.get("sweep_steps", 0)),
        variants={name: _variant(path, name, v) for name, v in d.get("variant", {}).items()},
        study=d.get("study", {}),
        overrides=overrides or {},
    )
    for a in list(preset.lr) + list(preset.arm_overrides):
        if a not in ARMS:
            raise ConfigError(f"{path}: unknown arm {a!r} in [lr]/[arm] (known: {', '.join(ARMS)})")
    arm_config(preset, preset.arms[0], preset.steps[0], 0, Path("validate"))  # fail early
    for v in preset.variants.values():
        arm_config(preset, v.arm, preset.steps[0], 0, Path("validate"), variant=v)
    return preset


def _variant(path: Path, name: str, d: Any) -> Variant:
    where = f"{path}: [variant.{name}]"
    if not isinstance(d, dict) or not isinstance(d.get("arm"), str):
        raise ConfigError(f"{where}: needs arm = one of {', '.join(ARMS)}")
    if d["arm"] not in ARMS:
        raise ConfigError(f"{where}: unknown arm {d['arm']!r} (known: {', '.join(ARMS)})")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{where}: a variant name may hold letters, digits, '_' and '-' only")
    sections = {k: v for k, v in d.items() if k not in ("arm", "about")}
    return Variant(name, d["arm"], str(d.get("about", "")), sections)


def arm_config(preset: Preset, arm: str, steps: int, seed_index: int, run_dir: Path,
               lr: float | None = None, variant: Variant | None = None) -> Config:
    arm_file = configs_dir() / f"{arm}.toml"
    layers = [(read_toml(arm_file), str(arm_file)), (preset.base, f"{preset.path} [base]")]
    if arm in preset.arm_overrides:
        layers.append((preset.arm_overrides[arm], f"{preset.path} [arm.{arm}]"))
    lr = lr if lr is not None else preset.lr.get(arm)
    if lr is not None:
        layers.append(({"train": {"lr": lr}}, f"{preset.path} [lr]"))
    if variant is not None:
        layers.append((variant.sections, f"{preset.path} [variant.{variant.name}]"))
    if preset.overrides:
        layers.append((preset.overrides, "command line"))
    base_seed = preset.base.get("train", {}).get("seed", Config().train.seed)
    run = {"train": {"steps": steps, "seed": int(base_seed) + seed_index, "out_dir": str(run_dir)}}
    layers.append((run, "reproduce grid"))
    return build_config(*layers)


@dataclass
class RunSpec:
    arm: str
    steps: int
    seed_index: int
    dir: Path
    cfg: Config
    lr_candidate: float | None = None
    variant: str | None = None

    @property
    def done(self) -> bool:
        return (self.dir / DONE_FILE).is_file()

    def status(self) -> dict[str, Any] | None:
        if not self.done:
            return None
        return json.loads((self.dir / DONE_FILE).read_text())


def seed_range(preset: Preset, seeds: int | None, only: int | None) -> list[int]:
    """Seed indices 0..seeds-1 (the preset's count by default), or just ``only``."""
    n = seeds if seeds is not None else preset.seeds
    if only is None:
        return list(range(n))
    if only < 0:
        raise ConfigError(f"--seed-index must be >= 0, got {only}")
    return [only]


def plan_grid(preset: Preset, out: Path, arms: list[str] | None = None,
              steps: list[int] | None = None, seeds: int | None = None,
              only_seed: int | None = None) -> list[RunSpec]:
    specs = []  # regime-major: every arm at the first regime finishes before the next regime
    for n in steps or preset.steps:
        for s in seed_range(preset, seeds, only_seed):
            for arm in arms or preset.arms:
                d = out / "runs" / f"{arm}-{n}steps-seed{s}"
                specs.append(RunSpec(arm, n, s, d, arm_config(preset, arm, n, s, d)))
    return specs


def plan_sweep(preset: Preset, out: Path, lrs: list[float], steps: int,
               arms: list[str] | None = None) -> list[RunSpec]:
    specs = []
    for arm in arms or preset.arms:
        for lr in lrs:
            d = out / "sweep" / f"{arm}-lr{lr:g}"
            specs.append(RunSpec(arm, steps, 0, d, arm_config(preset, arm, steps, 0, d, lr), lr))
    return specs


def plan_variants(preset: Preset, out: Path, names: list[str] | None = None,
                  steps: list[int] | None = None, seeds: int | None = None,
                  only_seed: int | None = None) -> list[RunSpec]:
    """Runs of ``[variant.*]`` under ``out/variants/NAME-<steps>steps-seed<s>`` (all variants
    when ``names`` is None)."""
    names = names or list(preset.variants)
    for n in names:
        if n not in preset.variants:
            known = ", ".join(preset.variants) or "none"
            raise ConfigError(f"{preset.path}: unknown variant {n!r} (known: {known})")
    specs = []
    for n in steps or preset.steps:
        for s in seed_range(preset, seeds, only_seed):
            for name in names:
                v = preset.variants[name]
                d = out / "variants" / f"{name}-{n}steps-seed{s}"
                specs.append(RunSpec(v.arm, n, s, d, arm_config(preset, v.arm, n, s, d, variant=v),
                                     variant=name))
    return specs


def finished_extras(preset: Preset | None, out: Path, specs: list[RunSpec],
                    kind: str = "runs") -> list[RunSpec]:
    """Finished runs under ``out/<kind>`` (``runs``, ``variants`` or ``sweep``) that ``specs``
    does not list: extra seeds or regimes run with ``--seeds``/``--steps``, other variants, other
    sweep LRs, so that a report counts every finished run. Grid runs and variants must belong to
    ``preset``; a sweep run's LR becomes its ``lr_candidate``."""
    from hgf.runs import load_run_config

    known = {s.dir.resolve() for s in specs}
    extra = []
    for done in sorted((out / kind).glob(f"*/{DONE_FILE}")):
        if done.parent.resolve() in known:
            continue
        st = json.loads(done.read_text())
        if kind == "variants" and st.get("variant") not in preset.variants:
            continue
        if kind == "runs" and st.get("arm") not in preset.arms:
            continue
        extra.append(RunSpec(st["arm"], int(st["steps"]), int(st.get("seed_index", 0)),
                             done.parent, load_run_config(done.parent),
                             lr_candidate=st["lr"] if kind == "sweep" else None,
                             variant=st.get("variant")))
    return extra
