"""IoU-vs-N plots: the figure the research question is about.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, so no display is needed and no
pyplot global state is touched (safe in Hydra multiruns and threads).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from rescue.reporting.tables import (
    ESTIMATOR_ORDER,
    METRIC_TITLES,
    SELECTOR_ORDER,
    ordered,
    with_subset,
)

# one colour per selector, the same in every plot of every run
COLORS = {"verifier": "#1f77b4", "executor": "#ff7f0e", "consensus": "#2ca02c",
          "first": "#8c564b", "random": "#7f7f7f", "oracle": "#d62728"}
ESTIMATOR_LABELS = {"best_of_n": "best-of-N (exact expectation)", "prefix": "first N (prefix)"}


def plot_iou_vs_n(metrics: pd.DataFrame, out_path: Path | str, metric: str = "giou",
                  estimator: str = "best_of_n", simulated: bool = False,
                  subset: str = "all") -> Path:
    """One line per selector with its bootstrap band, N on a log2 axis; oracle dashed."""
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {sorted(METRIC_TITLES)}, got {metric!r}")
    df = with_subset(metrics)
    df = df[(df["estimator"] == estimator) & (df["subset"].astype(str) == subset)]
    if df.empty:
        raise ValueError(f"no metrics rows for estimator={estimator!r}, subset={subset!r} "
                         f"(estimators: {ordered(metrics['estimator'].unique(), ESTIMATOR_ORDER)})")
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ns = sorted(int(n) for n in df["n"].unique())
    for sel in ordered(df["selector"].astype(str).unique(), SELECTOR_ORDER):
        s = df[df["selector"] == sel].sort_values("n")
        x, y = s["n"].to_numpy(float), 100.0 * s[metric].to_numpy(float)
        color = COLORS.get(sel)
        oracle = sel == "oracle"
        (line,) = ax.plot(x, y, marker="o", markersize=4, linewidth=2.2 if sel != "oracle" else 1.6,
                          linestyle="--" if oracle else "-", color=color,
                          label=sel + (" (upper bound)" if oracle else ""))
        lo, hi = s.get(f"{metric}_lo"), s.get(f"{metric}_hi")
        if lo is not None and hi is not None and lo.notna().any():
            ax.fill_between(x, 100.0 * lo.to_numpy(float), 100.0 * hi.to_numpy(float),
                            color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ns))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in ns])
    if len(ns) == 1:
        ax.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
    ax.set_xlabel("N (hypotheses per sample)")
    ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=9, frameon=False)
    samples = int(df["num_samples"].max()) if "num_samples" in df.columns else None
    title = f"{METRIC_TITLES[metric]} vs N — {ESTIMATOR_LABELS.get(estimator, estimator)}"
    if subset != "all":
        title += f", subset {subset}"
    if samples is not None:
        title += f", {samples} samples"
    ax.set_title(title, fontsize=11)
    if metric == "ciou":
        ax.text(0.99, 0.01, "cIoU@N = E[ΣI] / E[ΣU]", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=8, color="#555555")
    if simulated:
        fig.suptitle("SIMULATED models — measures the framework, not a model",
                     color="#b00020", fontsize=12, fontweight="bold")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def write_plots(metrics: pd.DataFrame, out_dir: Path | str,
                simulated: bool = False) -> dict[str, Path]:
    """iou_vs_n.png (gIoU) and ciou_vs_n.png for best-of-N, plus the prefix gIoU when present."""
    out = Path(out_dir)
    paths = {"iou_vs_n": plot_iou_vs_n(metrics, out / "iou_vs_n.png", "giou",
                                       simulated=simulated),
             "ciou_vs_n": plot_iou_vs_n(metrics, out / "ciou_vs_n.png", "ciou",
                                        simulated=simulated)}
    if (metrics["estimator"] == "prefix").any():
        paths["iou_vs_n_prefix"] = plot_iou_vs_n(metrics, out / "iou_vs_n_prefix.png", "giou",
                                                 estimator="prefix", simulated=simulated)
    return paths
