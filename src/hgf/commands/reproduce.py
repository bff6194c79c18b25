"""``hgf reproduce --preset {smoke,cpu,paper}``: the paper's comparison, measured here.

Runs every arm at every step regime and seed (finished runs are skipped, an interrupted one resumes
from its checkpoint), then writes ``report.md``, ``results.json``, ``results.csv`` and plots.
``--sweep`` runs the preset's LR sweep instead and writes ``sweep.json`` with each arm's best LR.
``--variants`` runs the preset's ``[variant.*]`` changes of one arm and writes ``variants.md``,
comparing each with the grid's arms at the same regime. Reports count every finished grid run in
OUT, including extra seeds run with ``--seeds``. ``--seed-index I`` runs only seed I (one grid
spread over several processes); ``--section.key=value`` overrides every run's config (e.g.
``--train.dtype=float32`` to train a preset in float32 on a GPU, whose default is bf16 autocast).
A preset with a ``[study]`` table also rebuilds
that study's report (``results/cpu/why.md`` for ``name = "why"``, :mod:`hgf.reproduce.why`) from
every run of the study's presets (with ``--out``: ``OUT/why.md``, the other presets' runs read from
their default folders). ``--preset convert`` (a preset with ``[study]`` and no ``[grid]``)
is the conversion study: it runs :mod:`hgf.reproduce.convert_study` with ``--out``, ``--arms``,
``--seeds``, ``--report-only`` and ``--background``; one whose ``[study]`` has ``name = "methods"``
(``--preset methods --report-only``) rebuilds the methods report (:mod:`hgf.reproduce.methods`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the paper's arm comparison and write a report")
    p.add_argument("--preset", default="smoke",
                   help="smoke | cpu | paper | why_tokens | why_width | why_lr | convert | methods | "
                   "path to a "
                   "preset TOML")
    p.add_argument("--arms", type=lambda s: s.split(","), help="comma-separated subset of arms")
    p.add_argument("--steps", type=_ints, help="step regimes, e.g. 2500,3500")
    p.add_argument("--seeds", type=int, help="number of seeds")
    p.add_argument("--seed-index", type=int,
                   help="run only this seed index (0-based): spreads one grid over processes")
    p.add_argument("--out", help="output folder (default results/<preset>)")
    p.add_argument("--sweep", action="store_true", help="run the LR sweep instead of the grid")
    p.add_argument("--lrs", type=_floats, help="LR candidates for --sweep (default: the preset's)")
    p.add_argument("--sweep-steps", type=int, help="steps of each sweep run (default: the preset's)")
    p.add_argument("--variants", type=lambda s: s.split(","),
                   help="run the preset's [variant.*] studies instead of the grid: 'all' or names")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")
    p.add_argument("--background", action="store_true",
                   help="run detached; progress goes to OUT/reproduce.log")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from hgf.config import parse_overrides
    from hgf.errors import HGFError
    from hgf.reproduce.grid import load_preset

    kind = study_kind(args.preset)
    if kind is not None and overrides:
        raise HGFError(f"--section.key=value overrides apply to grid presets, not to "
                       f"{args.preset!r}")
    if kind == "methods" and args.seed_index is not None:
        raise HGFError(f"--seed-index applies to grid presets and the conversion study, not to "
                       f"{args.preset!r}")
    if kind == "methods":
        return run_methods_report(args)
    if kind == "convert":
        return run_conversion_study(args)
    over = parse_overrides(overrides)
    fixed = sorted(f"train.{k}" for k in over.get("train", {}) if k in ("steps", "seed", "out_dir"))
    if fixed:
        raise HGFError(f"--{fixed[0]} is set by the grid for each run: use --steps, --seeds, "
                       "--seed-index or --out")
    preset = load_preset(args.preset, over)
    out = Path(args.out or Path("results") / preset.name)
    if preset.study:
        from hgf.reproduce.why import experiments, write_why

        experiments(preset)  # a bad [study] fails now, not after the runs
    if args.background:
        return detach(out, args.argv)
    code = _run_preset(args, preset, out)
    if preset.study.get("name"):
        # with --out, the study report goes there too: results/cpu/why.md is the default folders'
        path = (write_why(preset.study["name"], {preset.name: out}, report_dir=out) if args.out
                else write_why(preset.study["name"]))
        print(f"study report: {path}")
    return code


def study_kind(name_or_path: str) -> str | None:
    """What a preset without ``[grid]`` is, by its ``[study]``: ``name = "methods"`` is the
    methods report (configs/reproduce/methods.toml, :mod:`hgf.reproduce.methods`); any other
    ``[study]`` without ``[grid]`` is the conversion study (configs/reproduce/convert.toml,
    :mod:`hgf.reproduce.convert_study`); None for a grid preset."""
    from hgf.config import read_toml
    from hgf.reproduce.grid import resolve_preset

    d = read_toml(resolve_preset(name_or_path))
    if "study" not in d or "grid" in d:
        return None
    return "methods" if d["study"].get("name") == "methods" else "convert"


def is_conversion_study(name_or_path: str) -> bool:
    """A preset with ``[study]`` and no ``[grid]``, other than a methods report, is the
    conversion study, run by :mod:`hgf.reproduce.convert_study`."""
    return study_kind(name_or_path) == "convert"


def run_methods_report(args: argparse.Namespace) -> int:
    """``hgf reproduce --preset methods --report-only [--out CPU_DIR]``: the methods report
    (:mod:`hgf.reproduce.methods`) from the grid runs under ``--out`` (default results/cpu)."""
    from hgf.errors import HGFError
    from hgf.reproduce import methods

    for flag, value in (("--arms", args.arms), ("--steps", args.steps), ("--seeds", args.seeds),
                        ("--sweep", args.sweep), ("--lrs", args.lrs),
                        ("--sweep-steps", args.sweep_steps), ("--variants", args.variants),
                        ("--background", args.background)):
        if value:
            raise HGFError(f"{flag} does not apply to the methods report {args.preset!r} (it "
                           "reads existing runs: --report-only [--out GRID_OUT])")
    if not args.report_only:
        raise HGFError(f"{args.preset!r} runs nothing itself: use --report-only (the runs come "
                       "from `hgf reproduce --preset cpu --arms ...`)")
    return methods.main(["--preset", args.preset] + (["--cpu", args.out] if args.out else []))


def run_conversion_study(args: argparse.Namespace) -> int:
    """``hgf reproduce --preset convert ...`` = ``python -m hgf.reproduce.convert_study ...``."""
    from hgf.errors import HGFError
    from hgf.reproduce import convert_study

    for flag, value in (("--steps", args.steps), ("--sweep", args.sweep), ("--lrs", args.lrs),
                        ("--sweep-steps", args.sweep_steps), ("--variants", args.variants)):
        if value:
            raise HGFError(f"{flag} does not apply to the conversion study {args.preset!r} "
                           "(it takes --out, --arms, --seeds, --seed-index, --report-only, "
                           "--background)")
    argv = ["--preset", args.preset]
    argv += ["--out", args.out] if args.out else []
    argv += ["--arms", ",".join(args.arms)] if args.arms else []
    argv += ["--seeds", str(args.seeds)] if args.seeds else []
    argv += ["--seed-index", str(args.seed_index)] if args.seed_index is not None else []
    argv += ["--report-only"] * args.report_only + ["--background"] * args.background
    return convert_study.main(argv)


def _run_preset(args: argparse.Namespace, preset, out: Path) -> int:
    from hgf.reproduce.grid import finished_extras, plan_grid, plan_sweep, plan_variants
    from hgf.reproduce.report import write_report, write_sweep
    from hgf.reproduce.runner import run_specs

    if args.sweep:
        lrs = args.lrs or preset.lr_sweep
        steps = args.sweep_steps or preset.sweep_steps or min(preset.steps)
        specs = plan_sweep(preset, out, lrs, steps, args.arms)
        run_specs(specs)
        print(write_sweep(specs, out))
        return 0
    if args.variants:
        from hgf.reproduce.variants import write_variants

        names = None if args.variants == ["all"] else args.variants
        specs = plan_variants(preset, out, names, args.steps, args.seeds, args.seed_index)
        if not args.report_only:
            run_specs(specs)
        grid = plan_grid(preset, out)
        specs = specs + finished_extras(preset, out, specs, kind="variants")
        path = write_variants(preset, specs, grid + finished_extras(preset, out, grid), out)
        print(f"variant report: {path}")
        return 0
    specs = plan_grid(preset, out, args.arms, args.steps, args.seeds, args.seed_index)
    if not args.report_only:
        run_specs(specs)
    full = plan_grid(preset, out)  # a partial command (--arms/--steps/--seeds) reports the grid
    runs = full + finished_extras(preset, out, full)
    if args.report_only and preset.variants and not any(s.done for s in runs):
        # a preset run only through its variants (why_lr): a grid report would list every grid
        # run as unfinished and ask to run them
        print(f"report: none (no run of the preset's grid in {out}; its variants' report: "
              "--variants all --report-only)")
        return 0
    path = write_report(preset, runs, out)
    print(f"report: {path}")
    return 0


def detach(out: Path, argv: list[str], module: str = "hgf", log_name: str = "reproduce.log") -> int:
    """Rerun ``python -m module argv`` (less ``--background``) detached, logging to OUT/log_name."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / log_name
    argv = [a for a in argv if a != "--background"]
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"running in the background (pid {proc.pid}); log: {log}")
    print("rerun the same command without --background to resume it if it is stopped")
    return 0
