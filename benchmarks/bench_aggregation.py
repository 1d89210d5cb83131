"""Time the aggregators (`rescue.aggregation`) per sample at ReasonSeg image size, and what
grouping pixels into atoms saves over voting pixel by pixel.

Pools: 1024 x 768 images, 16 candidates over 10 distinct masks (jittered ellipses around the
target and a distractor, one empty), verifier scores; every aggregator at N = 1, 2, 4, 8, 16,
best-of-N with 256 draws and the prefix estimator.
Usage: python benchmarks/bench_aggregation.py [--samples 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from rescue import aggregation, masks
from rescue.records import CandidateRecord, SampleRecord
from rescue.scoring import pair_iou
from rescue.truth import SampleTruth

H, W, M, D = 768, 1024, 16, 10
NS = (1, 2, 4, 8, 16)


def _ellipse(rng: np.random.Generator, cx: float, cy: float, r: float) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    centre = (cx + rng.normal(0, 0.1 * r), cy + rng.normal(0, 0.1 * r))
    axes = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.6, 1.0))
    cv2.ellipse(m, (centre, (2 * axes[0], 2 * axes[1]), float(rng.uniform(0, 180))), 1, -1)
    return m.astype(bool)


def make_pool(seed: int) -> tuple[SampleRecord, SampleTruth]:
    rng = np.random.default_rng(seed)
    target = _ellipse(rng, 400, 350, 180)
    distinct = [np.zeros((H, W), bool)] + [
        _ellipse(rng, *((400, 350, 180) if k % 3 else (750, 300, 120))) for k in range(D - 1)]
    rles = [masks.encode(m) for m in distinct]
    digests = [masks.digest(r) for r in rles]
    cands = []
    for k in range(M):
        d = int(rng.integers(D))
        pred = distinct[d]
        inter, union = int((pred & target).sum()), int((pred | target).sum())
        cands.append(CandidateRecord(index=k, mask_key=digests[d], area=int(pred.sum()),
                                     intersection=inter, union=union, iou=inter / union,
                                     verifier_score=float(rng.random())))
    rec = SampleRecord(sample_id=f"s{seed}", dataset="bench", query="q", height=H, width=W,
                       target_area=int(target.sum()), simulated=True, candidates=cands,
                       masks=digests, mask_iou=pair_iou(rles).tolist())
    return rec, SampleTruth(rec.sample_id, masks.encode(target), None, dict(zip(digests, rles,
                                                                                strict=True)))


def by_pixel(pool: aggregation.Pool, rec: SampleRecord, truth: SampleTruth) -> aggregation.Pool:
    """The same pool with one column per covered pixel (no atoms): the reference cost."""
    full = np.stack([masks.decode(truth.masks[d]).ravel() for d in rec.masks])
    keep = full.any(axis=0)
    return dataclasses.replace(pool, masks=full[:, keep],
                               target=truth.target_mask().ravel()[keep],
                               weight=np.ones(int(keep.sum()), dtype=np.int64))


def evaluate(pool: aggregation.Pool, sid: str) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = [aggregation.estimate(a, pool, n, estimator=e, seed=0, sample_id=sid).values
           for a in aggregation.AGGREGATORS.values() for e in ("best_of_n", "prefix")
           for n in NS]
    return time.perf_counter() - t0, np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    t_atoms = t_pixels = t_build = 0.0
    sizes = []
    for s in range(args.samples):
        rec, truth = make_pool(s)
        t0 = time.perf_counter()
        pool = aggregation.Pool.of(rec, truth)
        t_build += time.perf_counter() - t0
        sizes.append((pool.masks.shape[1], int(pool.weight.sum())))
        ta, va = evaluate(pool, rec.sample_id)
        tp, vp = evaluate(by_pixel(pool, rec, truth), rec.sample_id)
        assert np.allclose(va, vp), "atoms must give the pixels' numbers"
        t_atoms, t_pixels = t_atoms + ta, t_pixels + tp
    n = args.samples
    print(f"pool {W}x{H}, M={M}, D={D}: {np.mean([a for a, _ in sizes]):.0f} atoms for "
          f"{np.mean([p for _, p in sizes]):.0f} covered pixels")
    print(f"per sample, 4 aggregators x 5 N x 2 estimators: building the pool "
          f"{t_build / n:.2f} s, atoms {t_atoms / n:.2f} s, pixel by pixel {t_pixels / n:.2f} s "
          f"({t_pixels / t_atoms:.1f}x)")


if __name__ == "__main__":
    main()
