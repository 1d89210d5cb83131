"""Time the classical executor (GrabCut) per prompt on synthetic scenes, and print its quality.

For each image size: every object of the scenes prompted with its exact box and with a jittered
box (edges moved by a normal 8% of the box size, the demo planner's default), single-threaded.
Usage: python benchmarks/bench_grabcut.py [--sizes 256 512] [--samples 20] [--difficulty medium]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from rescue import masks
from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import Prompt
from rescue.models.classical import grabcut_segment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--difficulty", default="medium")
    ap.add_argument("--jitter", type=float, default=0.08)
    args = ap.parse_args()
    print(f"{'size':>5} {'prompts':>7} {'ms/prompt (median)':>19} {'ms (mean)':>9} "
          f"{'IoU exact box':>13} {'IoU jittered':>12}")
    for size in args.sizes:
        ds = SyntheticDataset(num_samples=args.samples, seed=1, height=size, width=size,
                              difficulty=args.difficulty)
        rng = np.random.default_rng(0)
        times, exact, jittered = [], [], []
        for sid in ds.sample_ids():
            scene = ds.scene(sid)
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                w, h = x2 - x1, y2 - y1
                jit = tuple(np.array(obj.box) + rng.normal(0, args.jitter, 4) * [w, h, w, h])
                for box, out in ((obj.box, exact), (jit, jittered)):
                    t = time.perf_counter()
                    seg = grabcut_segment(scene.image, Prompt(box=box))
                    times.append(1000 * (time.perf_counter() - t))
                    m = masks.decode(seg.rle) if seg.ok else np.zeros_like(obj.visible)
                    out.append((m & obj.visible).sum() / max(1, (m | obj.visible).sum()))
        print(f"{size:>5} {len(times):>7} {statistics.median(times):>19.1f} "
              f"{statistics.mean(times):>9.1f} {np.mean(exact):>13.3f} {np.mean(jittered):>12.3f}")


if __name__ == "__main__":
    main()
