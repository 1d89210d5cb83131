"""Metrics and failure tables a researcher reads: CSV for code, markdown for eyes.

The metrics frame has one row per (estimator, selector, N) — optionally per `subset` — with
gIoU/cIoU as fractions in [0, 1] and bootstrap bounds. The markdown shows them as percentages,
rows N and columns selector, so "how does quality grow with N" reads down a column.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rescue import selection
from rescue.evaluation import failure_shares, failure_summary, truncation_shares
from rescue.records import SampleRecord, reason_code

SELECTOR_ORDER = tuple(selection.SELECTORS)
BOUNDS = frozenset(s.name for s in selection.SELECTORS.values() if s.needs_truth)
"""Selectors that read the truth: upper bounds, never the best of a table."""
ESTIMATOR_ORDER = ("best_of_n", "prefix")
ESTIMATOR_TITLES = {
    "best_of_n": "best-of-N: expected pick from a uniformly random N-subset of the max_n "
                 "cached candidates",
    "prefix": "prefix: the first N candidates (what a deployed system with budget N does)",
}
METRIC_TITLES = {"giou": "gIoU", "ciou": "cIoU"}
CIOU_NOTE = ("cIoU@N = E[ΣI] / E[ΣU]: the selection weights are applied to intersection and "
             "union separately, each summed over samples, then divided.")
SIMULATED_NOTE = ("**SIMULATED models.** These records were made with simulated planner/verifier "
                  "that read the ground truth: the numbers measure the framework, not a model.")
REQUIRED_COLUMNS = ("estimator", "selector", "n", "giou", "ciou")
FAILURE_COLUMNS = ["stage", "reason", "count", "fraction", "samples", "example"]


def ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """Known names in their canonical order, then unknown ones alphabetically."""
    vals = set(values)
    return [v for v in order if v in vals] + sorted(vals - set(order))


def with_subset(metrics: pd.DataFrame) -> pd.DataFrame:
    """The frame with a `subset` column ("all" when the evaluation reported no subsets)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}; has {list(metrics.columns)}")
    if "subset" in metrics.columns:
        return metrics
    return metrics.assign(subset="all")


def subset_order(metrics: pd.DataFrame) -> list[str]:
    return ordered(with_subset(metrics)["subset"].astype(str).unique(), ("all",))


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal; "–" for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return "–"
    return f"{100.0 * float(v):.1f}"


def cell(row: pd.Series, metric: str) -> str:
    """`value [lo, hi]` in percent, or the value alone where the row has no interval."""
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    value = pct(row[metric])
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return value
    return f"{value} [{pct(lo)}, {pct(hi)}]"


def markdown_table(header: Sequence[str], align: str,
                   rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table; `align` holds one "l" or "r" per column."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule,
            *("| " + " | ".join(row) + " |" for row in rows)]


def by_n_table(block: pd.DataFrame, key: str, columns: Sequence[str], metric: str,
               header: Sequence[str] | None = None, bold: bool = True,
               not_contenders: Iterable[str] = ()) -> list[str]:
    """Rows N, one column per value of `key` (`header` their titles): the metric with its
    interval, the best contender at each N in bold. Ties share the bold; when every contender
    ties (e.g. N = 1) nobody is best."""
    rows = []
    for n in sorted(int(n) for n in block["n"].unique()):
        at_n = block[block["n"] == n].set_index(key)
        contenders = at_n.drop(index=list(not_contenders), errors="ignore")[metric].dropna()
        best = (set(contenders.index[contenders == contenders.max()])
                if bold and contenders.nunique() > 1 else set())
        cells = [str(n)]
        for c in columns:
            text = cell(at_n.loc[c], metric) if c in at_n.index else ""
            cells.append(f"**{text}**" if c in best else text)
        rows.append(cells)
    return markdown_table(["N", *(header or columns)], "r" * (1 + len(columns)), rows)


def _metric_table(block: pd.DataFrame, metric: str) -> list[str]:
    # the oracle (a bound, not a contender) is never bold
    selectors = ordered(block["selector"].astype(str).unique(), SELECTOR_ORDER)
    return by_n_table(block, "selector", selectors, metric, not_contenders=BOUNDS)


def metrics_markdown(metrics: pd.DataFrame, simulated: bool = False) -> str:
    """Every (subset, estimator) as a gIoU and a cIoU table; best_of_n before prefix."""
    df = with_subset(metrics)
    out = ["# RESCue metrics", ""]
    if simulated:
        out += [f"> {SIMULATED_NOTE}", ""]
    out += ["Values are percentages; `[lo, hi]` is the bootstrap confidence interval over samples. "
            "gIoU = mean per-sample IoU; cIoU = ΣI / ΣU over the dataset. "
            "**Bold**: best selector at that N (the oracle, an upper bound, is not a contender).",
            "", CIOU_NOTE, ""]
    for subset in subset_order(df):
        sub = df[df["subset"].astype(str) == subset]
        for est in ordered(sub["estimator"].astype(str).unique(), ESTIMATOR_ORDER):
            block = sub[sub["estimator"].astype(str) == est]
            heading = f"## {est}" + ("" if subset == "all" else f" — subset `{subset}`")
            out += [heading, "", f"_{ESTIMATOR_TITLES.get(est, est)}._", ""]
            if "num_samples" in block.columns:
                n_samples = int(block["num_samples"].max())
                failed = (int(block["num_failed_samples"].max())
                          if "num_failed_samples" in block.columns else 0)
                out += [f"Samples: {n_samples} (failed entirely: {failed}).", ""]
            for metric in ("giou", "ciou"):
                out += [f"### {METRIC_TITLES[metric]} (%)", ""]
                out += _metric_table(block, metric)
                out.append("")
    return "\n".join(out)


def write_metrics(metrics: pd.DataFrame, out_dir: Path | str,
                  simulated: bool = False) -> dict[str, Path]:
    """metrics.csv (exact values, every column, and `simulated` on every row: a table copied
    out of its run still says whether models made it) and metrics.md (readable tables)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "metrics.csv", out / "metrics.md"
    metrics.assign(simulated=simulated).to_csv(csv_path, index=False)
    md_path.write_text(metrics_markdown(metrics, simulated=simulated), encoding="utf-8")
    return {"metrics_csv": csv_path, "metrics_md": md_path}


def failure_table(records: Sequence[SampleRecord]) -> pd.DataFrame:
    """Failed candidates counted by (stage, reason), most frequent first.

    A sample that failed as a whole (no candidates) counts once under stage "sample".
    `fraction` is of all candidates; `samples` is how many samples the failure touched.
    """
    counts: Counter[tuple[str, str]] = Counter()
    touched: dict[tuple[str, str], set[str]] = {}
    example: dict[tuple[str, str], str] = {}
    total = 0
    for r in records:
        failures = [("sample", r.error)] if r.error is not None else []
        for c in r.candidates:
            total += 1
            if c.failed_stage is not None:
                failures.append((c.failed_stage, c.error))
        for stage, error in failures:
            key = (str(stage), reason_code(error))
            counts[key] += 1
            touched.setdefault(key, set()).add(r.sample_id)
            example.setdefault(key, (error or "")[:300])
    rows = [(stage, reason, n, n / total if total else math.nan, len(touched[(stage, reason)]),
             example[(stage, reason)])
            for (stage, reason), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS).astype({"count": int, "samples": int})


def write_failures(records: Sequence[SampleRecord], out_dir: Path | str,
                   simulated: bool = False) -> Path:
    """failures.csv, `simulated` on every row (as in metrics.csv)."""
    path = Path(out_dir) / "failures.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    failure_table(records).assign(simulated=simulated).to_csv(path, index=False)
    return path


def _value(block: pd.DataFrame, selector: str, n: int, metric: str) -> float | None:
    hit = block[(block["selector"] == selector) & (block["n"] == n)]
    if hit.empty or pd.isna(hit[metric].iloc[0]):
        return None
    return float(hit[metric].iloc[0])


def summary(metrics: pd.DataFrame, primary: str = "verifier") -> dict[str, Any]:
    """Headline numbers for logs and W&B, from best-of-N over all samples.

    Keys: `giou@1`, `giou@<max>`, `giou@max` (and cIoU) for the primary selector, `gain@max`
    (gIoU@max − gIoU@1), `<selector>/giou@max` for every selector (oracle included), and
    `prefix/giou@max` when the prefix estimator is present.
    """
    df = with_subset(metrics)
    df = df[df["subset"].astype(str) == "all"] if (df["subset"] == "all").any() else df
    est = "best_of_n" if (df["estimator"] == "best_of_n").any() else None
    if est is None:
        raise ValueError("metrics table has no best_of_n rows to summarise")
    block = df[df["estimator"] == est]
    if primary not in set(block["selector"]):
        raise ValueError(f"primary selector {primary!r} not in the metrics table "
                         f"(has {sorted(set(block['selector']))})")
    max_n = int(block["n"].max())
    out: dict[str, Any] = {"primary": primary, "max_n": max_n}
    if "num_samples" in block.columns:
        out["num_samples"] = int(block["num_samples"].max())
    if "num_failed_samples" in block.columns:
        out["num_failed_samples"] = int(block["num_failed_samples"].max())
    for metric in ("giou", "ciou"):
        at1 = _value(block, primary, 1, metric)
        at_max = _value(block, primary, max_n, metric)
        out[f"{metric}@1"] = at1
        out[f"{metric}@{max_n}"] = at_max
        out[f"{metric}@max"] = at_max
        for sel in ordered(block["selector"].unique(), SELECTOR_ORDER):
            out[f"{sel}/{metric}@max"] = _value(block, sel, max_n, metric)
    if out["giou@1"] is not None and out["giou@max"] is not None:
        out["gain@max"] = out["giou@max"] - out["giou@1"]
    prefix = df[df["estimator"] == "prefix"]
    if not prefix.empty and primary in set(prefix["selector"]):
        pmax = int(prefix["n"].max())
        out["prefix/giou@max"] = _value(prefix, primary, pmax, "giou")
        out["prefix/ciou@max"] = _value(prefix, primary, pmax, "ciou")
    return out


def failure_counts(records: Sequence[SampleRecord]) -> dict[str, Any]:
    """Totals for summary.json (candidates, failed candidates, failed ones per stage), read
    from the one tally of failures, `evaluation.failure_summary`."""
    s = failure_summary(records)
    return {"num_records": s["samples"], "num_candidates": s["candidates"],
            "num_failed_candidates": s["failed_candidates"],
            "num_failed_records": sum(s["sample_errors"].values()),
            "failed_by_stage": s["by_stage"],
            "failure_share": failure_shares(records),
            "truncated_share": truncation_shares(records)}
