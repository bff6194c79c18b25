"""Report figures: validation-loss curves of all arms per regime, and HGF gate trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Each arm has its own colour and its own line style; variants and other labels get the other
# colours, then the other colours with the next line style (ARM_STYLES' combinations never recur).
ARM_STYLES: dict[str, tuple[str, Any]] = {
    "fp16": ("tab:blue", "-"),
    "bitnet": ("tab:red", "--"),
    "diff_only": ("tab:purple", ":"),
    "hgf": ("tab:green", "-."),
    "hgf_std": ("tab:olive", (0, (5, 1))),
    "bitnet_diff": ("tab:orange", (0, (3, 1, 1, 1, 1, 1))),
    "tequila": ("tab:cyan", (0, (1, 3))),
    "sherry": ("tab:brown", (0, (8, 3, 2, 3))),
}
LINE_STYLES: list[Any] = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)),
                          (0, (8, 3, 2, 3))]
OTHER_COLORS = ["tab:pink", "tab:gray", "black", "gold", "navy",
                "teal", "magenta", "lime"]


def label_styles(labels: list[str]) -> dict[str, tuple[str, Any]]:
    """(colour, line style) per label: an arm's own, else a combination no other label has."""
    out: dict[str, tuple[str, Any]] = {}
    others = [lb for lb in dict.fromkeys(labels) if lb not in ARM_STYLES]
    for lb in dict.fromkeys(labels):
        if lb in ARM_STYLES:
            out[lb] = ARM_STYLES[lb]
    for i, lb in enumerate(others):
        out[lb] = (OTHER_COLORS[i % len(OTHER_COLORS)],
                   LINE_STYLES[(i // len(OTHER_COLORS)) % len(LINE_STYLES)])
    return out


def _tokens(runs: list[dict[str, Any]], key: str) -> int:
    return max((r.get(key) or 0 for r in runs), default=0)


def plot_val_curves(runs: list[dict[str, Any]], out: Path, prefix: str = "val_loss",
                    title: str = "Validation loss") -> list[Path]:
    """One figure per regime, ``out/<prefix>_<steps>.png``: for every run of seed 0, labelled by
    its variant or arm, the loss on the fixed evaluation subset vs step (a line) and the loss on
    the full validation set after the last step (a diamond: the report's table)."""
    from matplotlib.lines import Line2D

    plt = _plt()
    paths = []
    for steps in sorted({r["steps"] for r in runs}):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        shown = [r for r in runs if r["steps"] == steps and r["seed_index"] == 0 and r["val_curve"]]
        styles = label_styles([r.get("variant") or r["arm"] for r in shown])
        for r in shown:
            label = r.get("variant") or r["arm"]
            color, ls = styles[label]
            xs, ys = zip(*r["val_curve"], strict=True)
            ax.plot(xs, ys, linestyle=ls, color=color, lw=1.4,
                    label=label + (" (diverged)" if r["diverged"] else ""))
            if r["diverged"]:
                ax.plot(xs[-1:], ys[-1:], "x", color=color, ms=8)
            if r.get("full_validation"):
                ax.plot([r["steps"]], [r["val_loss"]], "D", color=color, ms=5,
                        markeredgecolor="black", markeredgewidth=0.5)
        handles, _ = ax.get_legend_handles_labels()
        sub, full = _tokens(shown, "subset_tokens"), _tokens(shown, "full_tokens")
        every = shown[0].get("eval_every") if shown else None
        sub_text = "lines: fixed evaluation subset" + (f" ({sub:,} tokens" if sub else "") + (
            f", every {every} steps" if every else "") + (")" if sub else "")
        if full:
            handles.append(Line2D([], [], linestyle="", marker="D", color="gray",
                                  markeredgecolor="black", markeredgewidth=0.5,
                                  label=f"full validation set ({full:,} tokens)"))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{title}, {steps}-step regime\n{sub_text}"
                     + ("; diamonds: full validation set (table)" if full else ""),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7 if len(handles) > 8 else 8)
        path = out / f"{prefix}_{steps}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _layer(name: str) -> int | None:
    """The layer index in a projection name such as ``layers.3.attn.q_proj``."""
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def gate_styles(names: list[str]) -> dict[str, tuple[Any, Any, str | None]]:
    """(colour, line style, marker) per projection name: the colour names the projection
    (q_proj, ...), the line style its layer; past len(LINE_STYLES) layers the styles recur with a
    marker, so no two projections look alike."""
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    roles = sorted({n.rsplit(".", 1)[-1] for n in names})
    layers = sorted({lay for lay in map(_layer, names) if lay is not None})
    color = {role: colors[i % len(colors)] for i, role in enumerate(roles)}
    style = {lay: LINE_STYLES[i % len(LINE_STYLES)] for i, lay in enumerate(layers)}
    markers = [None, "o", "s", "^", "v", "D", "x", "+"]
    marker = {lay: markers[i // len(LINE_STYLES) % len(markers)] for i, lay in enumerate(layers)}
    return {n: (color[n.rsplit(".", 1)[-1]], style.get(_layer(n), "-"), marker.get(_layer(n)))
            for n in names}


def plot_gates(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Gate trajectories of the hgf arm's longest seed-0 run, one line per projection (colour:
    the projection, line style: the layer; see gate_styles), read at each evaluation."""
    from matplotlib.lines import Line2D

    cand = [r for r in runs if r["arm"] == "hgf" and r["seed_index"] == 0 and r["gates"]]
    if not cand:
        return None
    r = max(cand, key=lambda r: r["steps"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(r["gates"][0][1])
    styles = gate_styles(names)
    steps = [s for s, _ in r["gates"]]
    for name in names:
        color, ls, marker = styles[name]
        ax.plot(steps, [g.get(name, float("nan")) for _, g in r["gates"]], lw=1.2, color=color,
                linestyle=ls, marker=marker, ms=3)
    roles = {n.rsplit(".", 1)[-1]: styles[n][0] for n in sorted(names)}
    layers = {_layer(n): styles[n][1:] for n in names if _layer(n) is not None}
    handles = [Line2D([], [], color=c, lw=2, label=role) for role, c in roles.items()]
    handles += [Line2D([], [], color="black", lw=1.2, linestyle=ls, marker=m, ms=3,
                       label=f"layer {lay}") for lay, (ls, m) in sorted(layers.items())]
    ax.set_xlabel("step")
    ax.set_ylabel("gate g")
    ax.set_title(f"HGF gates, {r['steps']}-step run ({len(names)} projections: colour = "
                 "projection, line style = layer)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=6, ncol=2)
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


def plot_loss_by(series: dict[str, list[tuple[float, list[float], bool]]], xlabel: str,
                 path: Path, title: str) -> Path:
    """Final loss against a setting (training steps, learning rate; log scale), one line per
    label through the means over seeds, every seed a dot; a cell with a diverged run is a cross."""
    import math

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = label_styles(list(series))
    for label, pts in series.items():
        color, ls = styles[label]
        pts = sorted(pts, key=lambda p: p[0])
        xs = [x for x, _, _ in pts]
        means = [sum(v for v in ls_ if math.isfinite(v)) / max(1, sum(map(math.isfinite, ls_)))
                 if any(map(math.isfinite, ls_)) else math.nan for _, ls_, _ in pts]
        ax.plot(xs, means, linestyle=ls, color=color, lw=1.4, marker="o", ms=4, label=label)
        for x, losses, diverged in pts:
            ax.plot([x] * len(losses), losses, "x" if diverged else ".", color=color, ms=7,
                    alpha=0.7)
    ax.set_xscale("log")
    ax.set_xticks(sorted({x for pts in series.values() for x, _, _ in pts}))
    ax.get_xaxis().set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.get_xaxis().set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title + "\nline: mean over seeds; dots: seeds; x: a diverged run", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
