"""Compare runs as one study: `python -m analysis.compare <run or multirun dirs...>`.

Writes, into `--out` (default: the one directory given):
- `study.csv`: every metrics row of every run, with the run's label and varying overrides;
- `study.md`: rows N, one column per run (labelled by its varying overrides) for one selector,
  with bootstrap intervals; the same for the oracle; and every selector at each run's largest N;
- `study_iou_vs_n.png` (`study_ciou_vs_n.png` for `--metric ciou`): one line per run for the
  selector with its light bootstrap band (the level in the legend's title, from each run's
  `selection.ci`), each run's oracle dashed in the same colour, drawn above every line.
Any simulated run makes every output say SIMULATED.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from analysis.runs import NoRunsError, Run, cli, load_runs, run_labels, study_table
from rescue.reporting.plots import Bands, band, interval_text, n_axis, new_figure, save_png
from rescue.reporting.tables import (
    ESTIMATOR_TITLES,
    METRIC_TITLES,
    SELECTOR_ORDER,
    SIMULATED_NOTE,
    by_n_table,
    markdown_table,
    ordered,
    pct,
)

PLOT_NAMES = {"giou": "study_iou_vs_n.png", "ciou": "study_ciou_vs_n.png"}


def pareto_frontier(points: pd.DataFrame, cost: str = "total_tokens",
                    metric: str = "giou") -> pd.DataFrame:
    """The rows no other row dominates (cost no higher and quality no lower, one strictly),
    by increasing cost; rows without a finite cost are not candidates."""
    p = points[points[cost].notna() & points[metric].notna()]
    p = p.sort_values([cost, metric], ascending=[True, False], kind="stable")
    keep, best = [], -math.inf
    for i, q in zip(p.index, p[metric], strict=True):
        if q > best:
            keep.append(i)
            best = q
    return p.loc[keep]


def cheapest_reaching(points: pd.DataFrame, fractions: Sequence[float] = (0.9, 0.95, 0.99),
                      cost: str = "total_tokens", metric: str = "giou") -> pd.DataFrame:
    """Per fraction X: the cheapest row whose quality reaches X × the best quality of any row
    (upper bounds that read the truth excluded by the caller)."""
    p = points[points[cost].notna() & points[metric].notna()]
    if p.empty:
        return pd.DataFrame(columns=["fraction", "target", *p.columns])
    top = float(p[metric].max())
    rows = []
    for x in fractions:
        ok = p[p[metric] >= x * top].sort_values(cost, kind="stable")
        rows.append({"fraction": x, "target": x * top, **ok.iloc[0].to_dict()})
    return pd.DataFrame(rows)


def _short(label: str, width: int = 90) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _block(table: pd.DataFrame, estimator: str, subset: str) -> pd.DataFrame:
    df = table if "subset" in table.columns else table.assign(subset="all")
    return df[(df["estimator"] == estimator) & (df["subset"].astype(str) == subset)]


def _runs_by_n(block: pd.DataFrame, labels: Sequence[str], selector: str, metric: str,
               bold: bool = True) -> list[str]:
    """Rows N, columns runs; the best run at each N in bold (none when they all tie)."""
    return by_n_table(block[block["selector"] == selector], "run", labels, metric,
                      header=[f"`{lab}`" for lab in labels], bold=bold)


def _selectors_at_max(block: pd.DataFrame, labels: Sequence[str], metric: str) -> list[str]:
    selectors = ordered(block["selector"].astype(str).unique(), SELECTOR_ORDER)
    rows = []
    for lab in labels:
        at_run = block[block["run"] == lab]
        if at_run.empty:
            continue
        n = int(at_run["n"].max())
        at = at_run[at_run["n"] == n].set_index("selector")
        rows.append([f"`{lab}`", str(n),
                     *(pct(at.loc[s, metric]) if s in at.index else "" for s in selectors)])
    return markdown_table(["run", "N", *selectors], "lr" + "r" * len(selectors), rows)


def study_markdown(table: pd.DataFrame, runs: Sequence[Run], selector: str = "verifier",
                   metric: str = "giou", estimator: str = "best_of_n",
                   subset: str = "all") -> str:
    """The study as markdown: which runs, then the selector's and the oracle's metric vs N."""
    labels = run_labels(runs)
    block = _block(table, estimator, subset)
    name = METRIC_TITLES[metric]
    varying = table.attrs.get("varying", [])
    out = [f"# RESCue study: {name} of `{selector}` vs N, {len(runs)} runs", ""]
    if any(r.simulated for r in runs):
        out += [f"> {SIMULATED_NOTE} (SIMULATED runs are marked in the list below.)", ""]
    out += [f"_{ESTIMATOR_TITLES.get(estimator, estimator)}._ Subset `{subset}`. "
            "Values are percentages; `[lo, hi]` is the bootstrap confidence interval over "
            "samples. **Bold**: the best run at that N.", "",
            "Varying overrides: " + (", ".join(f"`{k}`" for k in varying) or "none") + ".", ""]
    listed = []
    for lab, run in zip(labels, runs, strict=True):
        rows = block[block["run"] == lab]
        samples = int(rows["num_samples"].max()) if "num_samples" in rows and len(rows) else "–"
        listed.append([f"`{lab}`", f"`{run.path}`", str(samples),
                       "SIMULATED" if run.simulated else "no"])
    out += markdown_table(["run", "directory", "samples", "simulated"], "llrl", listed)
    out.append("")
    missing = [lab for lab in labels if block[(block["run"] == lab)
                                              & (block["selector"] == selector)].empty]
    if missing:
        out += [f"No `{selector}` rows in: " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    out += [f"## {name} (%) — `{selector}`", ""]
    out += _runs_by_n(block, labels, selector, metric)
    if selector != "oracle" and (block["selector"] == "oracle").any():
        out += ["", f"## {name} (%) — `oracle` (upper bound: true IoU picks)", ""]
        out += _runs_by_n(block, labels, "oracle", metric, bold=False)
    out += ["", f"## {name} (%) of every selector at each run's largest N", ""]
    out += _selectors_at_max(block, labels, metric)
    return "\n".join(out) + "\n"


def _interval_note(runs: Sequence[Run]) -> str:
    """What the study plot's shading is, from each run's own `selection.ci`/`bootstrap`."""
    levels = set()
    for run in runs:
        try:
            settings = run.evaluation_settings()
        except ValueError:  # a run whose saved config does not say (made by an old version)
            return "shaded: bootstrap CI over samples (level not recorded by every run)"
        levels.add((settings.ci, settings.bootstrap))
    if len(levels) == 1:
        return Bands(*levels.pop()).note()
    return "shaded: bootstrap CI over samples, per run: " + ", ".join(
        interval_text(ci, b) if b else "none" for ci, b in sorted(levels))


ORACLE_STYLE = {"linestyle": (0, (4, 2)), "linewidth": 1.3, "alpha": 0.85, "marker": "^",
                "markersize": 4, "markerfacecolor": "white", "zorder": 3}
"""Each run's oracle: dashed, hollow triangles, drawn above every run's line so none hides it."""


def study_figure(table: pd.DataFrame, runs: Sequence[Run], selector: str = "verifier",
                 metric: str = "giou", estimator: str = "best_of_n", subset: str = "all"
                 ) -> Figure:
    """One line (with its light bootstrap band) per run for `selector`, and each run's oracle
    dashed in the same colour above them; the legend's title says what the shading is."""
    labels = run_labels(runs)
    block = _block(table, estimator, subset)
    # many runs: a taller figure with the legend below the axes, so the plot keeps its size
    below = len(labels) > 6
    ncols = 2 if max(len(lab) for lab in labels) <= 45 else 1
    height = 4.8 + (0.2 * math.ceil((len(labels) + 1) / ncols) if below else 0.0)
    fig, ax = new_figure(height)
    cmap = colormaps["tab10"]
    ns: set[int] = set()
    for i, lab in enumerate(labels):
        color = cmap(i % 10)
        rows = block[block["run"] == lab]
        for sel, style in ((selector, {"linestyle": "-", "linewidth": 2.2, "marker": "o",
                                       "markersize": 4, "label": _short(lab), "zorder": 2}),
                           ("oracle", {**ORACLE_STYLE, "label": None})):
            s = rows[rows["selector"] == sel].sort_values("n")
            if s.empty or (sel == "oracle" and selector == "oracle"):
                continue
            x, y = s["n"].to_numpy(float), 100.0 * s[metric].to_numpy(float)
            ns.update(int(n) for n in x)
            ax.plot(x, y, color=color, **style)
            if sel == selector:
                band(ax, s, metric, color)
    if not ns:
        raise ValueError(f"no rows for selector={selector!r}, estimator={estimator!r}, "
                         f"subset={subset!r} in any run")
    n_axis(ax, sorted(ns), metric)
    if selector != "oracle" and (block["selector"] == "oracle").any():
        ax.plot([], [], color="#555555", **{**ORACLE_STYLE, "label": "oracle (each run)"})
    legend = {"fontsize": 8, "frameon": False, "title": _interval_note(runs),
              "title_fontsize": 8}
    if below:
        fig.legend(loc="outside lower center", ncols=ncols, **legend)
    else:
        ax.legend(loc="best", **legend)
    ax.set_title(f"{METRIC_TITLES[metric]} of {selector} vs N ({estimator}, subset {subset})",
                 fontsize=11)
    return fig


def plot_study(table: pd.DataFrame, runs: Sequence[Run], out_path: str | Path,
               selector: str = "verifier", metric: str = "giou", estimator: str = "best_of_n",
               subset: str = "all") -> Path:
    """`study_figure` written to `out_path` (SIMULATED in its title when any run is)."""
    return save_png(study_figure(table, runs, selector, metric, estimator, subset), out_path,
                    any(r.simulated for r in runs))


def compare(sources: Iterable[str | Path], out_dir: str | Path, selector: str = "verifier",
            metric: str = "giou", estimator: str = "best_of_n",
            subset: str = "all") -> dict[str, Path]:
    """Find the runs in `sources`, write study.csv, study.md and the plot into `out_dir`."""
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {sorted(METRIC_TITLES)}, got {metric!r}")
    runs = load_runs(sources)
    table = study_table(runs)
    if _block(table, estimator, subset).empty:
        raise ValueError(f"no metrics rows with estimator={estimator!r} and subset={subset!r}; "
                         f"estimators: {sorted(table['estimator'].unique())}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "study.csv", "md": out / "study.md", "plot": out / PLOT_NAMES[metric]}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(study_markdown(table, runs, selector, metric, estimator, subset),
                           encoding="utf-8")
    plot_study(table, runs, paths["plot"], selector, metric, estimator, subset)
    points = _block(table, estimator, subset)
    points = points[~points["selector"].isin(UPPER_BOUNDS)]
    if "total_tokens" in points.columns and points["total_tokens"].notna().any():
        paths["frontier"] = out / "study_frontier.md"
        paths["frontier"].write_text(frontier_markdown(points, metric), encoding="utf-8")
        paths["frontier_plot"] = save_png(frontier_figure(points, metric),
                                          out / f"study_{metric}_frontier.png",
                                          bool(points["simulated"].any())
                                          if "simulated" in points.columns else False)
    return paths


UPPER_BOUNDS = ("oracle",)
"""Selectors that read the truth: never on a frontier of methods."""


def frontier_figure(points: pd.DataFrame, metric: str = "giou",
                    cost: str = "total_tokens") -> Figure:
    """Quality against expected tokens per sample for every (run, selector) through its N, a
    faint line each, and the Pareto frontier over all of them as one black step line with its
    points named: where in a study the compute buys quality, and what is dominated."""
    fig, ax = new_figure(5.6)
    p = points[points[cost].notna() & points[metric].notna()]
    for _, line in p.groupby(["run", "selector"], sort=False):
        line = line.sort_values("n")
        ax.plot(line[cost], 100 * line[metric], marker=".", lw=0.8, alpha=0.35,
                color="#7f7f7f")
    front = pareto_frontier(p, cost, metric)
    ax.step(front[cost], 100 * front[metric], where="post", color="black", lw=1.6,
            marker="o", ms=4, label="Pareto frontier (no cheaper row is as good)", zorder=3)
    for _, row in front.iterrows():
        ax.annotate(f"{row['run']} · {row['selector']} @N={row['n']}",
                    (row[cost], 100 * row[metric]), textcoords="offset points",
                    xytext=(4, -10), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel(f"expected {cost.replace('_', ' ')} per sample (log)")
    ax.set_ylabel(f"{METRIC_TITLES[metric]} (%)")
    ax.set_title(f"{METRIC_TITLES[metric]} against compute: every run, selector and N "
                 "(grey), frontier (black)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def frontier_markdown(points: pd.DataFrame, metric: str = "giou",
                      cost: str = "total_tokens") -> str:
    """The Pareto frontier over runs, selectors and N (quality against expected tokens per
    sample), and the cheapest configuration reaching 90/95/99 % of the best."""
    cols = ["run", "selector", "n", metric, cost, "verify_tokens"]
    front = pareto_frontier(points, cost, metric)[cols]
    cheap = cheapest_reaching(points, cost=cost, metric=metric)
    def table(df: pd.DataFrame) -> list[str]:
        return markdown_table(list(df.columns), "l" * 2 + "r" * (len(df.columns) - 2),
                              [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
                               for row in df.itertuples(index=False)])

    lines = [f"# Quality per unit of compute ({METRIC_TITLES[metric]} vs {cost})", "",
             "## Pareto frontier", "", *table(front), "",
             f"## Cheapest configuration reaching X% of the best {METRIC_TITLES[metric]}", "",
             *table(cheap[["fraction", "target", *cols]])]
    if points.get("simulated") is not None and bool(points["simulated"].any()):
        lines += ["", SIMULATED_NOTE]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="run directories and/or multirun directories")
    parser.add_argument("--out", help="where to write (default: the one directory given)")
    parser.add_argument("--selector", default="verifier")
    parser.add_argument("--metric", default="giou", choices=sorted(METRIC_TITLES))
    parser.add_argument("--estimator", default="best_of_n")
    parser.add_argument("--subset", default="all", help="'all' or a tag (e.g. long, short)")
    args = parser.parse_args(argv)
    if args.out is None and len(args.dirs) != 1:
        parser.error("--out is required when comparing more than one directory")
    return cli(lambda: compare(args.dirs, args.out or args.dirs[0], args.selector, args.metric,
                               args.estimator, args.subset), (NoRunsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
