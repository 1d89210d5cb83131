"""Time `rescue.evaluation.evaluate` at full study size and print the figures.

Default size: 5000 samples x 64 candidates x 6 selectors x 7 N x 2 estimators, 1000 bootstraps.
Usage: python benchmarks/bench_evaluation.py [--samples 5000] [--m 64] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from rescue import selection
from rescue.evaluation import evaluate
from rescue.records import CandidateRecord, SampleRecord
from rescue.settings import EvaluationSettings

SELECTORS = selection.DEFAULTS  # the six a run evaluates by default


def make_records(samples: int, m: int, seed: int = 0) -> list[SampleRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for s in range(samples):
        target = int(rng.integers(100, 10_000))
        cands = []
        for k in range(m):
            if rng.random() < 0.05:
                cands.append(CandidateRecord(index=k, failed_stage="execute", error="Timeout: x"))
                continue
            inter = int(rng.integers(0, target + 1))
            union = target + int(rng.integers(0, 5_000))
            iou = inter / union
            cands.append(CandidateRecord(
                index=k, intersection=inter, union=union, iou=iou,
                verifier_score=float(np.clip(iou + rng.normal(0, 0.2), 0, 1)),
                executor_score=float(rng.random()), consensus=float(rng.random()),
            ))
        # distinct masks (about half the candidates repeat one) and their pairwise IoU, so
        # consensus is scored within subsets as in a real run
        distinct = max(m // 2, 1)
        keys = [f"m{j}" for j in range(distinct)]
        for c in cands:
            if c.ok:
                c.mask_key = keys[int(rng.integers(distinct))]
        a = np.triu(rng.random((distinct, distinct)), 1)
        pair = (a + a.T + np.eye(distinct)).round(6).tolist()
        tags = ["long" if s % 3 == 0 else "short"]
        records.append(SampleRecord(sample_id=f"s{s:05d}", dataset="bench", query="q",
                                    height=100, width=100, target_area=target, simulated=True,
                                    candidates=cands, tags=tags, masks=keys, mask_iou=pair))
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    n_grid = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.m]
    t0 = time.perf_counter()
    records = make_records(args.samples, args.m)
    t1 = time.perf_counter()
    settings = EvaluationSettings(n_grid=tuple(n_grid), selectors=SELECTORS,
                                  bootstrap=args.bootstrap)
    df = evaluate(records, settings, by_tag=False)
    t2 = time.perf_counter()
    df_tags = evaluate(records, settings, by_tag=True)
    t3 = time.perf_counter()
    pool_level = tuple(s for s in SELECTORS if s.within is None)
    evaluate(records, dataclasses.replace(settings, selectors=pool_level), by_tag=False)
    t4 = time.perf_counter()
    print(f"records: {args.samples} samples x {args.m} candidates (built in {t1 - t0:.2f} s)")
    print(f"grid: {len(SELECTORS)} selectors x {len(n_grid)} N x 2 estimators = {len(df)} rows, "
          f"{args.bootstrap} bootstraps")
    print(f"evaluate (all):          {t2 - t1:.2f} s, {args.samples / (t2 - t1):,.0f} samples/s")
    print(f"evaluate (all + 2 tags): {t3 - t2:.2f} s, {args.samples / (t3 - t2):,.0f} samples/s "
          f"({len(df_tags)} rows)")
    print(f"evaluate (no consensus): {t4 - t3:.2f} s: consensus within subsets costs "
          f"{(t2 - t1) / (t4 - t3):.1f}x the other {len(pool_level)} selectors together")


if __name__ == "__main__":
    main()
