"""Fit loss vs compute per group of a sweep and plot it (PNG, one panel per metric)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tools.scaling.fit import PowerLawFit, fit_power_law


def group_key(row: dict, group_by: list[str]) -> str:
    return ",".join(f"{k}={row[k]}" for k in group_by) or "all"


def fit_groups(rows: list[dict], metrics: list[str], group_by: list[str],
               method: str = "wald") -> dict[str, dict[str, dict]]:
    """``metric -> group -> {"points": [[compute, loss], ...], "fit": {...} or None,
    "why": reason when not fitted}``."""
    out: dict[str, dict[str, dict]] = {}
    for metric in metrics:
        per_group: dict[str, dict] = {}
        for row in rows:
            if metric not in row:
                continue
            g = per_group.setdefault(group_key(row, group_by), {"points": []})
            g["points"].append([row["compute"], row[metric]])
        for g in per_group.values():
            g["points"].sort()
            pts = np.asarray(g["points"])
            try:
                g["fit"] = fit_power_law(pts[:, 0], pts[:, 1], method=method).to_dict()
            except (ValueError, RuntimeError) as err:
                g["fit"], g["why"] = None, str(err)
        out[metric] = per_group
    return out


def plot_fits(fits: dict[str, dict[str, dict]], path: str | Path, title: str) -> Path:
    """Loss vs compute (log x), points and fitted curves with each exponent's interval."""
    metrics = list(fits)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (group, g) in enumerate(sorted(fits[metric].items())):
            color = f"C{i}"
            pts = np.asarray(g["points"])
            ax.scatter(pts[:, 0], pts[:, 1], color=color, s=22, zorder=3)
            label = group
            if g.get("fit"):
                f = g["fit"]
                fit = PowerLawFit(a=f["a"], b=f["b"], c=f["c"], c0=f["c0"], n=f["n"],
                                  rmse=f["rmse"], level=f["level"])
                xs = np.geomspace(pts[:, 0].min() / 1.3, pts[:, 0].max() * 1.3, 100)
                ax.plot(xs, fit.predict(xs), color=color, lw=1.5)
                lo, hi = f["ci"]["b"]
                label += f": b={f['b']:.2f} [{lo:.2f}, {hi:.2f}], c={f['c']:.2f}"
            else:
                ax.plot(pts[:, 0], pts[:, 1], color=color, lw=1, ls="--")
            ax.plot([], [], color=color, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + "  (fit: L = a (C/C0)^-b + c, 95% intervals)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_fits(fits: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(fits, indent=1))
    return path
