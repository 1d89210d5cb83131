"""`mode=evaluate`: recompute a run's metrics from its records, and the report they make.

    python run.py mode=evaluate records_from=<run dir> selection.bootstrap=5000

`report` is also how `run` and `merge` end: the same records and settings give the same
metrics.csv, plots and summary.json whichever mode wrote them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rescue import console, records, truth
from rescue.errors import ConfigError
from rescue.evaluation import evaluate, headline
from rescue.records import SampleRecord
from rescue.run_dir import RunDir
from rescue.settings import EvaluationSettings
from rescue.truth import SampleTruth

log = logging.getLogger("rescue")

if TYPE_CHECKING:  # reporting draws with matplotlib and OpenCV: loaded when a report is made
    from rescue.reporting.overlays import OverlayItem


def report(cfg: DictConfig, out_dir: Path, recs: Sequence[SampleRecord],
           settings: EvaluationSettings, items: Sequence[OverlayItem] = (), *,
           simulated: bool, truths: Mapping[str, SampleTruth] | None = None
           ) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Evaluate `recs` with `settings` (aggregators read `truths`) and write the report into
    `out_dir`."""
    from rescue.reporting import write_report

    metrics = evaluate(recs, settings, truths=truths)
    paths = write_report(out_dir, recs, metrics, items, simulated=simulated,
                         primary=settings.primary.name,
                         selectors=(*settings.selectors, *settings.aggregators),
                         plots=bool(cfg.report.plot))
    return metrics, paths


def reevaluate(cfg: DictConfig) -> dict[str, Any]:
    """Recompute metrics from an existing run's records (`records_from=<run dir>`)."""
    # the pools are whatever the run generated: N is bounded by them, not by this max_n
    settings = EvaluationSettings.from_config(cfg, bounded=False)
    if cfg.get("records_from") is None:
        raise ConfigError("mode=evaluate needs records_from=<run dir> (a directory that "
                          "`python run.py` wrote, e.g. outputs/runs/demo/<time>)")
    source = RunDir(Path(str(cfg.records_from)))
    src = source.records_source  # an evaluate run's: its source's
    if not src.is_file():
        raise ConfigError(f"mode=evaluate: records_from={cfg.records_from} holds no "
                          f"records ({src} not found)")
    recs = list(records.read(src))
    # what aggregators read: the truth and masks kept beside the records, not the dataset
    truths = truth.load(source.masks_source) if settings.aggregators else None
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # what made this metrics.csv, for the analysis tools (`analysis.runs.Run.evaluation_settings`)
    RunDir(out_dir).resolved_config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    simulated = any(r.simulated for r in recs)
    log.info("re-evaluating %d samples of %s", len(recs), source.path)
    metrics, paths = report(cfg, out_dir, recs, settings, simulated=simulated, truths=truths)
    console.final_block(recs, metrics, settings, out_dir, simulated=simulated)
    return {"records": recs, "metrics": metrics, "paths": paths, "settings": settings}


def main(cfg: DictConfig) -> float | None:
    """The primary selector's gIoU at max N (for sweepers)."""
    result = reevaluate(cfg)
    return headline(result["metrics"], result["settings"])
