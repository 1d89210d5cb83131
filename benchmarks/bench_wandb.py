"""What W&B costs a run: import, init, logging a report, finish — offline, in a fresh process.

    python benchmarks/bench_wandb.py [--runs 3]

Prints seconds per phase for each run in one process (the first pays the import and the
wandb-core service start; later ones show the per-run cost a Hydra multirun job pays).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def metrics(rows: int = 16) -> pd.DataFrame:
    recs = []
    for est in ("best_of_n", "prefix"):
        for sel in ("verifier", "executor", "consensus", "first", "random", "oracle"):
            for n in (1, 2, 4, 8, 16, 32, 64)[: max(1, rows // 2)]:
                g = 0.3 + 0.02 * np.log2(n)
                recs.append(dict(estimator=est, selector=sel, n=n, giou=g, ciou=g, giou_lo=g - .02,
                                 giou_hi=g + .02, ciou_lo=g - .03, ciou_hi=g + .03,
                                 num_samples=100, num_failed_samples=0))
    return pd.DataFrame(recs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
                          WANDB_CONFIG_DIR=f"{tmp}/cfg", WANDB_CACHE_DIR=f"{tmp}/cache",
                          WANDB_DATA_DIR=f"{tmp}/data")
        os.environ.pop("WANDB_API_KEY", None)
        from rescue.reporting import log_report, write_report
        from rescue.reporting.wandb_logger import WandbLogger

        df = metrics()
        paths = write_report(Path(tmp) / "report", [], df, [], simulated=True)
        print("run  import_s  init_s  log_s  finish_s  total_s")
        for k in range(args.runs):
            logger = WandbLogger(dir=Path(tmp) / f"run{k}")
            t0 = time.perf_counter()
            logger.start({"k": k, "max_n": 16}, name=f"bench{k}", simulated=True)
            t1 = time.perf_counter()
            log_report(logger, paths, df)
            t2 = time.perf_counter()
            logger.finish()
            t3 = time.perf_counter()
            tm = logger.timings
            print(f"{k:>3}  {tm.get('import_s', 0):8.2f}  {tm.get('init_s', 0):6.2f}  "
                  f"{t2 - t1:5.2f}  {t3 - t2:8.2f}  {t3 - t0:7.2f}")
            if logger.errors:
                print("  errors:", logger.errors)


if __name__ == "__main__":
    main()
