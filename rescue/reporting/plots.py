"""IoU-vs-N plots: the figure the research question is about.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, so no display is needed and no
pyplot global state is touched (safe in Hydra multiruns and threads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from rescue import aggregation, colors, selection
from rescue.reporting.tables import ESTIMATOR_ORDER, METRIC_TITLES, ordered, with_subset
from rescue.selection import Selector

if TYPE_CHECKING:
    from rescue.aggregation import Aggregator
    from rescue.settings import EvaluationSettings

ESTIMATOR_LABELS = {"best_of_n": "best-of-N (exact expectation)", "prefix": "first N (prefix)"}
SIMULATED_TITLE = "SIMULATED models — measures the framework, not a model"


def new_figure(height: float = 4.8) -> tuple[Figure, Axes]:
    """A bare Agg figure with one axes, the size of every quality-vs-N plot."""
    fig = Figure(figsize=(7.5, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


BAND_ALPHA = 0.08
"""Light enough that a band under another selector's line never hides it."""


@dataclass(frozen=True)
class Bands:
    """Which lines of a quality-vs-N plot carry a confidence band, and what the band is.

    Only the `primary` selector's line and the upper bounds' (selectors that read the truth)
    are shaded; every other selector is a line alone, so the middle of the plot stays
    readable. The band is the percentile bootstrap interval over samples at level `ci` from
    `bootstrap` resamples (`selection.ci`, `selection.bootstrap`); `ci` None: the level is not
    known (a table read back without its settings), so no band is drawn rather than an
    unlabelled one.
    """

    ci: float | None
    bootstrap: int = 0
    primary: str | None = None

    @classmethod
    def of(cls, settings: EvaluationSettings, primary: str | None = None) -> Bands:
        """As the run's settings evaluated them; `primary` replaces the settings' primary."""
        return cls(settings.ci, settings.bootstrap, primary or settings.primary.name)

    @classmethod
    def of_table(cls, metrics: pd.DataFrame, primary: str | None = None) -> Bands:
        """As `rescue.evaluation.evaluate` recorded them in the frame's attrs (a frame read
        from metrics.csv has none: no bands)."""
        attrs = metrics.attrs
        ci = attrs.get("ci")
        return cls(float(ci) if ci is not None else None, int(attrs.get("bootstrap") or 0),
                   primary or attrs.get("primary"))

    @property
    def drawn(self) -> bool:
        return self.ci is not None and self.bootstrap > 0

    def shades(self, name: str, definition: Selector | Aggregator | None) -> bool:
        return self.drawn and (name == self.primary or bool(
            definition is not None and definition.needs_truth))

    def note(self) -> str:
        """What the shading is, for the legend's title."""
        if self.ci is None:
            return "no bands: the interval's level is not known"
        if self.bootstrap <= 0:
            return "no bands: selection.bootstrap=0"
        return f"shaded: {interval_text(self.ci, self.bootstrap)}"


def interval_text(ci: float, bootstrap: int) -> str:
    """`95% bootstrap CI over samples (1000 resamples)`."""
    return f"{100 * ci:g}% bootstrap CI over samples ({bootstrap} resamples)"


def line_colors(names: Sequence[str], known: Mapping[str, Selector | Aggregator]
                ) -> dict[str, str]:
    """Each line's colour: its definition's, else (a selector the palette does not know, e.g.
    a re-scored one) the palette colour farthest from every colour on the plot and every
    defined selector's and aggregator's, in the order of `names`: deterministic, and never the
    colour of a selector it could be mistaken for."""
    definitions = [*selection.SELECTORS.values(), *aggregation.AGGREGATORS.values(),
                   *known.values()]
    out = {n: known[n].color for n in names if n in known and known[n].color}
    taken = {colors.hex_rgb(str(c)) for c in out.values()}
    taken |= {colors.hex_rgb(d.color) for d in definitions if d.color}
    missing = [n for n in names if n not in out]
    for name, rgb in zip(missing, colors.distinct(len(missing), sorted(taken)), strict=True):
        out[name] = colors.rgb_hex(rgb)
    return out


def band(ax: Axes, rows: pd.DataFrame, metric: str, color: object,
         alpha: float = BAND_ALPHA) -> None:
    """The rows' bootstrap interval of `metric` (in %) as a band, where they have one."""
    lo, hi = rows.get(f"{metric}_lo"), rows.get(f"{metric}_hi")
    if lo is not None and hi is not None and lo.notna().any():
        ax.fill_between(rows["n"].to_numpy(float), 100.0 * lo.to_numpy(float),
                        100.0 * hi.to_numpy(float), color=color, alpha=alpha, linewidth=0)


def n_axis(ax: Axes, ns: Sequence[int], metric: str) -> None:
    """N on a log2 axis with a tick at every N evaluated; the metric in percent."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ns))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in ns])
    if len(ns) == 1:
        ax.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
    ax.set_xlabel("N (hypotheses per sample)")
    ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
    ax.grid(True, which="major", alpha=0.3)


def save_png(fig: Figure, out_path: Path | str, simulated: bool = False) -> Path:
    """Write the figure (its title saying SIMULATED when it is) as a PNG; returns the path."""
    if simulated:
        fig.suptitle(SIMULATED_TITLE, color="#b00020", fontsize=12, fontweight="bold")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def iou_vs_n_figure(metrics: pd.DataFrame, metric: str = "giou", estimator: str = "best_of_n",
                    subset: str = "all", selectors: Sequence[Selector] | None = None,
                    bands: Bands | None = None) -> Figure:
    """One line per selector, N on a log2 axis; `bands` (default: `Bands.of_table`) shade the
    primary's and the upper bounds' intervals and title the legend with their level.

    `selectors` (default: every defined one) give the lines their order and colour, and draw
    those that need the truth dashed, as upper bounds; a selector of the table without a
    definition (e.g. a re-scored one) comes after them in a colour of its own (`line_colors`).
    """
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {sorted(METRIC_TITLES)}, got {metric!r}")
    df = with_subset(metrics)
    df = df[(df["estimator"] == estimator) & (df["subset"].astype(str) == subset)]
    if df.empty:
        raise ValueError(f"no metrics rows for estimator={estimator!r}, subset={subset!r} "
                         f"(estimators: {ordered(metrics['estimator'].unique(), ESTIMATOR_ORDER)})")
    bands = bands if bands is not None else Bands.of_table(metrics)
    known = {s.name: s for s in (selection.SELECTORS.values() if selectors is None
                                 else selectors)}
    fig, ax = new_figure()
    ns = sorted(int(n) for n in df["n"].unique())
    names = ordered(df["selector"].astype(str).unique(), list(known))
    palette = line_colors(names, known)
    for name in names:
        s = df[df["selector"] == name].sort_values("n")
        sel = known.get(name)
        bound = sel is not None and sel.needs_truth
        ax.plot(s["n"].to_numpy(float), 100.0 * s[metric].to_numpy(float), marker="o",
                markersize=4, linewidth=1.6 if bound else 2.2, linestyle="--" if bound else "-",
                color=palette[name], label=name + (" (upper bound)" if bound else ""))
        if bands.shades(name, sel):
            band(ax, s, metric, palette[name])
    n_axis(ax, ns, metric)
    ax.legend(loc="best", fontsize=9, frameon=False, title=bands.note(), title_fontsize=8)
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
    return fig


def plot_iou_vs_n(metrics: pd.DataFrame, out_path: Path | str, metric: str = "giou",
                  estimator: str = "best_of_n", simulated: bool = False, subset: str = "all",
                  selectors: Sequence[Selector] | None = None,
                  bands: Bands | None = None) -> Path:
    """`iou_vs_n_figure` written to `out_path`."""
    return save_png(iou_vs_n_figure(metrics, metric, estimator, subset, selectors, bands),
                    out_path, simulated)


COST_AXES = {"verify_tokens": "expected verifier tokens per sample",
             "total_tokens": "expected tokens per sample (planner + verifier)"}
"""The cost columns (`rescue.evaluation.COST_COLUMNS`) quality is plotted against."""


def quality_vs_cost_figure(metrics: pd.DataFrame, estimator: str = "best_of_n",
                           selectors: Sequence[Selector] | None = None) -> Figure | None:
    """gIoU and cIoU (rows) against expected verifier tokens and total tokens (columns), one
    line per selector through its N values (each point labelled N); None when the table has
    no finite cost (records of a version that recorded none)."""
    df = with_subset(metrics)
    df = df[(df["estimator"] == estimator) & (df["subset"].astype(str) == "all")]
    if df.empty or any(c not in df.columns for c in COST_AXES) or \
            not df["total_tokens"].notna().any():
        return None
    known = {s.name: s for s in (selection.SELECTORS.values() if selectors is None
                                 else selectors)}
    palette = line_colors(ordered(df["selector"].astype(str).unique(), list(known)), known)
    fig = Figure(figsize=(11, 8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for row, metric in enumerate(("giou", "ciou")):
        for col, (cost, label) in enumerate(COST_AXES.items()):
            ax = axes[row][col]
            for name in ordered(df["selector"].astype(str).unique(), list(known)):
                s = df[(df["selector"] == name) & df[cost].notna()].sort_values("n")
                if s.empty:
                    continue
                sel = known.get(name)
                bound = sel is not None and sel.needs_truth
                x, y = s[cost].to_numpy(float), 100.0 * s[metric].to_numpy(float)
                ax.plot(x, y, marker="o", markersize=4, linestyle="--" if bound else "-",
                        color=palette[name], label=name)
                for xi, yi, n in zip(x, y, s["n"], strict=True):
                    ax.annotate(f"N={int(n)}", (xi, yi), fontsize=6, xytext=(2, 2),
                                textcoords="offset points")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8, frameon=False,
                      title="expected values (no intervals drawn)", title_fontsize=8)
    return fig


def write_plots(metrics: pd.DataFrame, out_dir: Path | str, simulated: bool = False,
                selectors: Sequence[Selector] | None = None,
                bands: Bands | None = None) -> dict[str, Path]:
    """iou_vs_n.png (gIoU) and ciou_vs_n.png for best-of-N, plus the prefix gIoU when present,
    and quality_vs_cost.png where the metrics carry costs."""
    out = Path(out_dir)
    kw = {"simulated": simulated, "selectors": selectors, "bands": bands}
    paths = {"iou_vs_n": plot_iou_vs_n(metrics, out / "iou_vs_n.png", "giou", **kw),
             "ciou_vs_n": plot_iou_vs_n(metrics, out / "ciou_vs_n.png", "ciou", **kw)}
    cost = quality_vs_cost_figure(metrics, selectors=selectors)
    if cost is not None:
        paths["quality_vs_cost"] = save_png(cost, out / "quality_vs_cost.png", simulated)
    if (metrics["estimator"] == "prefix").any():
        paths["iou_vs_n_prefix"] = plot_iou_vs_n(metrics, out / "iou_vs_n_prefix.png", "giou",
                                                 estimator="prefix", **kw)
    return paths
