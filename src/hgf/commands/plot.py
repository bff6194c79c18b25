"""``hgf plot RUN_DIR [RUN_DIR ...] [-o OUT]``: loss curves and gate trajectories as a PNG.

Panels, from ``metrics.jsonl``: training and validation loss (nats/token) against the step; every
HGF gate against the step (one colour per run); the mean fraction of zero ternary weights and the
ternary flip rate between evaluations. matplotlib (extra ``plot``) is imported only here, with the
Agg backend.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hgf.errors import HGFError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot loss curves and gate trajectories of runs (PNG)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", help="output PNG (default: RUN_DIR/plot.png for one run, "
                                       "plot.png for several)")
    p.set_defaults(func=run)


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records
           if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HGFError("hgf plot needs matplotlib: pip install 'hgf[plot]'") from None
    from hgf.train.metrics import read_metrics

    runs = {d: read_metrics(d) for d in run_dirs}
    fig, (ax_loss, ax_gate, ax_tern) = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (d, recs) in enumerate(runs.items()):
        c, name = colors[i % len(colors)], d.name
        ax_loss.plot(*_series(recs, "train", "loss"), color=c, alpha=0.5, lw=1, label=f"{name} train")
        ax_loss.plot(*_series(recs, "eval", "val_loss"), "o-", color=c, ms=3, label=f"{name} val")
        gate_recs = [r for r in recs if r.get("kind") == "train" and r.get("gates")]
        for j, gate in enumerate(gate_recs[0]["gates"] if gate_recs else []):
            steps = [r["step"] for r in gate_recs if gate in r["gates"]]
            vals = [r["gates"][gate] for r in gate_recs if gate in r["gates"]]
            ax_gate.plot(steps, vals, color=c, alpha=0.6, lw=1, label=name if j == 0 else None)
        evals = [r for r in recs if r.get("kind") == "eval" and r.get("zero_frac")]
        if evals:
            zero = [sum(r["zero_frac"].values()) / len(r["zero_frac"]) for r in evals]
            ax_tern.plot([r["step"] for r in evals], zero, "o-", color=c, ms=3,
                         label=f"{name} zero fraction")
            ax_tern.plot(*_series(evals, "eval", "flip_rate"), "x--", color=c, ms=4,
                         label=f"{name} flip rate")
    for ax, title in ((ax_loss, "loss (nats/token)"), (ax_gate, "HGF gates g"),
                      (ax_tern, "ternary weights")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else (dirs[0] / "plot.png" if len(dirs) == 1 else Path("plot.png"))
    print(plot_runs(dirs, out))
    return 0
