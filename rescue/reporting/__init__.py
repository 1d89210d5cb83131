"""What a researcher looks at after a run: tables, plots, overlays, summary, and W&B.

`write_report` turns records and the metrics frame into files in the run directory;
`log_report` hands the same to a `Logger` (W&B or nothing). The files are the record; a part
that cannot be drawn is logged and listed in summary.json, never the end of the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rescue.records import SampleRecord, json_safe
from rescue.reporting.logger import Logger, NullLogger
from rescue.reporting.overlays import OverlayItem, draw_candidates, write_overlays
from rescue.reporting.plots import Bands, plot_iou_vs_n, write_plots
from rescue.reporting.tables import (
    failure_counts,
    failure_table,
    summary,
    write_failures,
    write_metrics,
)
from rescue.selection import Selector

__all__ = [
    "Logger",
    "NullLogger",
    "OverlayItem",
    "draw_candidates",
    "failure_table",
    "log_report",
    "plot_iou_vs_n",
    "summary",
    "write_metrics",
    "write_overlays",
    "write_report",
]

log = logging.getLogger(__name__)


def write_report(out_dir: Path | str, records: Sequence[SampleRecord], metrics: pd.DataFrame,
                 overlay_items: Sequence[OverlayItem] = (), simulated: bool = False,
                 primary: str = "verifier", selectors: Sequence[Selector] | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """metrics.csv/.md, failures.csv, iou_vs_n.png, ciou_vs_n.png, overlays/*.png, summary.json.

    Returns name → path: "metrics_csv", "metrics_md", "failures_csv", "iou_vs_n", "ciou_vs_n"
    (and "iou_vs_n_prefix"), "overlays/<file stem>" per sheet, "summary". `selectors` style
    the plots (`plots.iou_vs_n_figure`), whose bands are the `primary`'s and the upper bounds'
    at the level `evaluate` recorded in the frame; `plots=False` (`report.plot`) draws none.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    problems: list[str] = []

    def attempt(what: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # one broken artefact must not lose the others
            problems.append(f"{what}: {type(exc).__name__}: {exc}")
            log.warning("report: %s failed: %s: %s", what, type(exc).__name__, exc)
            return None

    paths["failures_csv"] = write_failures(records, out, simulated=simulated)
    paths.update(write_metrics(metrics, out, simulated=simulated))  # a bad frame is a bug: raise
    if plots:
        paths.update(attempt("plots", lambda: write_plots(
            metrics, out, simulated=simulated, selectors=selectors,
            bands=Bands.of_table(metrics, primary))) or {})
    sheets = attempt("overlays", lambda: write_overlays(overlay_items, out / "overlays")) or []
    paths.update({f"overlays/{p.stem}": p for p in sheets})
    head: dict[str, Any] = {"simulated": bool(simulated)}
    head.update(attempt("summary", lambda: summary(metrics, primary)) or {"primary": primary})
    head.update(failure_counts(records))
    if simulated:
        head["note"] = "simulated models: these numbers measure the framework, not a model"
    if problems:
        head["report_errors"] = problems
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(json_safe(head), indent=2, sort_keys=True) + "\n",
                                encoding="utf-8")
    return paths


def log_report(logger: Logger, paths: Mapping[str, Path], metrics: pd.DataFrame,
               overlay_items: Sequence[OverlayItem] = ()) -> None:
    """Send a written report to the tracker: metrics, plots and sheets, mask layers, summary."""
    logger.log_metrics(metrics)
    logger.log_images({("plots/" + k if "/" not in k else k): p for k, p in paths.items()
                       if p.suffix == ".png"})
    logger.log_overlays(overlay_items)
    if "summary" in paths and Path(paths["summary"]).is_file():
        logger.log_summary(json.loads(Path(paths["summary"]).read_text(encoding="utf-8")))
