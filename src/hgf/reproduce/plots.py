"""Report figures: validation-loss curves of all arms per regime, and HGF gate trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_curves(runs: list[dict[str, Any]], out: Path, prefix: str = "val_loss",
                    title: str = "Validation loss") -> list[Path]:
    """One figure per regime, ``out/<prefix>_<steps>.png``: validation loss vs step for every
    run of seed 0, labelled by its variant or arm."""
    plt = _plt()
    paths = []
    for steps in sorted({r["steps"] for r in runs}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            if r["steps"] != steps or r["seed_index"] != 0 or not r["val_curve"]:
                continue
            xs, ys = zip(*r["val_curve"], strict=True)
            style = "--" if r["diverged"] else "-"
            label = r.get("variant") or r["arm"]
            ax.plot(xs, ys, style, label=label + (" (diverged)" if r["diverged"] else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{title}, {steps}-step regime")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / f"{prefix}_{steps}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_gates(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Gate trajectories of the hgf arm's longest seed-0 run, one line per projection."""
    cand = [r for r in runs if r["arm"] == "hgf" and r["seed_index"] == 0 and r["gates"]]
    if not cand:
        return None
    r = max(cand, key=lambda r: r["steps"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(r["gates"][0][1])
    steps = [s for s, _ in r["gates"]]
    for name in names:
        ax.plot(steps, [g.get(name, float("nan")) for _, g in r["gates"]], lw=1,
                label=name.replace("layers.", "L").replace(".attn", "").replace(".mlp", ""))
    ax.set_xlabel("step")
    ax.set_ylabel("gate g")
    ax.set_title(f"HGF gates, {r['steps']}-step run")
    ax.grid(alpha=0.3)
    if len(names) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
