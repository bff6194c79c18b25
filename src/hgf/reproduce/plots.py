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
        colors = plt.get_cmap("tab20").colors
        shown = [r for r in runs if r["steps"] == steps and r["seed_index"] == 0 and r["val_curve"]]
        for i, r in enumerate(shown):
            xs, ys = zip(*r["val_curve"], strict=True)
            style = "--" if r["diverged"] or i >= len(colors) else "-"
            label = r.get("variant") or r["arm"]
            ax.plot(xs, ys, style, color=colors[i % len(colors)],
                    label=label + (" (diverged)" if r["diverged"] else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{title}, {steps}-step regime")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(shown) > 8 else None)
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


def plot_final_losses(rows: list[tuple[str, list[float]]], band: tuple[float, float] | None,
                      path: Path, title: str) -> Path:
    """One row per arm or variant: every seed's final loss (dots) and their mean ± std (bar);
    ``band`` (mean, std) shades the reference arm's seed spread."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    for i, (_, losses) in enumerate(rows):
        ax.plot(losses, [i] * len(losses), "o", ms=4, alpha=0.6, color="tab:blue")
        if len(losses) > 1:
            mean = sum(losses) / len(losses)
            std = (sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) ** 0.5
            ax.errorbar([mean], [i], xerr=[std], fmt="D", color="black", ms=5, capsize=3)
    if band is not None:
        mean, std = band
        ax.axvline(mean, color="tab:red", lw=1)
        ax.axvspan(mean - std, mean + std, color="tab:red", alpha=0.12)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss (nats/token); diamonds: mean ± std over seeds")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
