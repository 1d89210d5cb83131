"""What a finished run or re-evaluation prints last: the headline, the failures by stage with
their share, and where the outputs are. `mode=run` and `mode=evaluate` print the same block.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rescue.evaluation import curve, failure_shares, truncation_shares
from rescue.records import SampleRecord
from rescue.settings import EvaluationSettings

log = logging.getLogger("rescue")


def final_block(recs: Sequence[SampleRecord], metrics: pd.DataFrame,
                settings: EvaluationSettings, out_dir: Path, *, simulated: bool,
                max_truncated: float = 0.05) -> None:
    """The closing lines of a run (see the module doc)."""
    _log_failure_shares(recs, max_truncated)
    _log_headline(metrics, settings, simulated=simulated)
    log.info("outputs in %s", out_dir)


def _log_failure_shares(recs: Sequence[SampleRecord], max_truncated: float) -> None:
    """Each stage's failure share and truncation rate, on the console; a warning when replies
    were cut off at max_tokens more often than `pipeline.max_truncated_share`."""
    shares = failure_shares(recs)
    if shares:
        log.info("failed: %s", " | ".join(f"{stage} {100 * v:.1f}%" for stage, v in
                                          shares.items()))
    for stage, share in truncation_shares(recs).items():
        if share > max_truncated:
            log.warning("%s: %.1f%% of replies were cut off at max_tokens (> %.1f%%): raise "
                        "%s.sampling.max_tokens", stage, 100 * share, 100 * max_truncated,
                        "planner" if stage == "plan" else "verifier")


def _log_headline(metrics: pd.DataFrame, settings: EvaluationSettings, *,
                  simulated: bool) -> None:
    """The number the study is about, on the console: the primary selector's gIoU from N=1 to
    max N beside the upper bounds' (the oracle; best-of-N over all samples)."""
    bounds = [s.name for s in settings.selectors if s.needs_truth and s != settings.primary]
    line = []
    for sel in (settings.primary.name, *bounds):
        s = curve(metrics, sel)
        if len(s):
            line.append(f"{sel} " + " ".join(f"@{int(n)}:{100 * g:.1f}"
                                              for n, g in zip(s.n, s.giou, strict=True)))
    if line:
        log.info("gIoU%% (best-of-N%s): %s", ", SIMULATED models" if simulated else "",
                 " | ".join(line))


