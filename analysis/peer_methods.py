"""The peer-methods study's one table and one figure: every aggregator and verifier variant.

    python -m analysis.peer_methods <run dir> [<run dir> ...] --out <dir>

Each run of `experiments/peer_methods.sh` evaluated the same cached pools with one verifier
variant (pointwise score, accept/reject, pairwise arena, listwise marks); a method is taken from
the first run that reports it (the oracle and the model-free aggregators agree across runs: the
pools are the same). Beside each method's gIoU at every N (best-of-N over random N-subsets,
bootstrap interval, ± the Monte-Carlo SE where the value is not exact) the table gives the run
it comes from and the calls that run made: the verifier's (by stage) and the planner's and
executor's (zero once the first run has cached the pools), and the verifier tokens its
answers cost (`rescue.cost`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from analysis.runs import Run, cli, load_runs
from rescue import aggregation, selection
from rescue.reporting.plots import Bands, interval_text, plot_iou_vs_n
from rescue.reporting.tables import SIMULATED_NOTE, cell, markdown_table

VERIFIER_STAGES = ("verify", "compare", "choose")


def _calls(run: Run) -> tuple[int, int, int]:
    """(verifier calls, planner + executor calls) the run made, and the verifier tokens its
    answers cost (`stats.json` cost per stage, cached answers included: what the method needs
    whoever paid for it; 0 where the run predates cost accounting)."""
    calls = run.stats.get("calls") or {}
    req = calls.get("requests") or {}
    verifier = sum(int(req.get(s, 0)) for s in VERIFIER_STAGES)
    costs = calls.get("cost") or {}
    tokens = sum(int((costs.get(s) or {}).get(k, 0)) for s in VERIFIER_STAGES
                 for k in ("prompt_tokens", "completion_tokens"))
    return verifier, int(req.get("plan", 0)) + int(req.get("execute", 0)), tokens


def peer_table(runs: Sequence[Run], estimator: str = "best_of_n",
               subset: str = "all") -> pd.DataFrame:
    """Every method's rows (the first run reporting it wins), with `run`, `simulated` (as
    every table has), `verifier_calls`, `verifier_tokens` (0 for a method that reads no
    verifier answer) and `planner_executor_calls` columns."""
    seen: set[str] = set()
    parts = []
    for run in runs:
        m = run.metrics
        if m.empty:
            raise ValueError(f"{run.path} has no metrics.csv")
        m = m[(m.estimator == estimator) & (m.get("subset", subset) == subset)]
        new = sorted(set(m.selector.astype(str)) - seen)
        seen |= set(new)
        verifier, others, tokens = _calls(run)
        for name in new:  # a method that reads no verifier answer is charged none
            reads = any(d.name == name and d.needs_verifier for d in _methods([name]))
            parts.append(m[m.selector == name].assign(
                run=run.path.name, simulated=run.simulated,
                verifier_calls=verifier if reads else 0,
                planner_executor_calls=others, verifier_tokens=tokens if reads else 0))
    return pd.concat(parts, ignore_index=True)


def _methods(names: Iterable[str]) -> list:
    """Selector or aggregator definitions, for the plot's colours and dashes."""
    out = []
    for n in names:
        if n in selection.SELECTORS:
            out.append(selection.SELECTORS[n])
        elif n in aggregation.AGGREGATORS:
            out.append(aggregation.AGGREGATORS[n])
    return out


def peer_markdown(table: pd.DataFrame, simulated: bool, interval: str) -> str:
    """The table; `interval` says what `[lo, hi]` is (`plots.interval_text`)."""
    ns = sorted(int(n) for n in table.n.unique())
    order = list(dict.fromkeys(table.selector.astype(str)))
    rows = []
    for name in order:
        block = table[table.selector == name].set_index("n")
        first = block.iloc[0]
        cells = [name, str(first.run), str(int(first.verifier_calls)),
                 str(int(first.verifier_tokens)), str(int(first.planner_executor_calls))]
        for n in ns:
            if n not in block.index:
                cells.append("")
                continue
            row = block.loc[n]
            text = cell(row, "giou")
            if not bool(row.get("exact", True)):
                text += f" ±{100 * float(row.giou_mc_se):.1f}"
            cells.append(text)
        rows.append(cells)
    lines = ["# Peer methods on the same cached pools", ""]
    if simulated:
        lines += [SIMULATED_NOTE, ""]
    lines += [f"gIoU % (best-of-N over uniformly random N-subsets; [{interval}]; "
              "±Monte-Carlo SE where not every subset was enumerated). Calls: what the run "
              "that reports the method asked of the verifier (0 where the method reads none of its "
              "answers) and of the planner + executor; "
              "verifier tokens: what its verifier answers cost, cached ones included "
              "(simulated models: simulated tokens).", ""]
    lines += markdown_table(["method", "run", "verifier calls", "verifier tokens",
                             "planner+executor calls", *(f"N={n}" for n in ns)],
                            "llrrr" + "r" * len(ns), rows)
    return "\n".join(lines) + "\n"


def write(sources: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    runs = load_runs(sources)
    table = peer_table(runs)
    simulated = any(r.simulated for r in runs)
    settings = runs[0].evaluation_settings()  # the pointwise run's level
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "peer_methods.csv", "md": out / "peer_methods.md"}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(peer_markdown(
        table, simulated, interval_text(settings.ci, settings.bootstrap)), encoding="utf-8")
    paths["plot"] = plot_iou_vs_n(table, out / "peer_methods_iou_vs_n.png", "giou",
                                  simulated=simulated,
                                  selectors=_methods(table.selector.astype(str).unique()),
                                  bands=Bands.of(settings))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.peer_methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, the pointwise one first")
    parser.add_argument("--out", required=True, help="where to write the table and figure")
    args = parser.parse_args(argv)
    return cli(lambda: write(args.runs, args.out), (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
