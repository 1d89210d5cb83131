"""Client CPU of a verifier's views per candidate mask: drawing (tint and outline, crop box,
zoom) and JPEG encoding, the shipped code against the formulas it replaced
(tests/reference_views.py, same bytes), measured in this one run.

    python benchmarks/bench_views.py [--samples 4] [--size 256] [--rounds 7]

Masks: per synthetic scene its target, every object, and each grown and shrunk by a few
pixels (small to large crops, both interpolations). Views and encoding are the shipped
verifier's (conf/verifier/qwen3vl_32b_thinking.yaml: overlay and crop, JPEG q90). Each stage
runs over every mask in alternating rounds, old then new; CPU is this process's CPU time (OpenCV's
own threads included), wall the elapsed time, both per mask, the minimum over rounds (the
median in brackets), so load from others sharing the cores inflates them least. Then the whole
`view_urls`, one call at a time, and in a WorkerPool of the cores with every mask submitted at
once (as the verifier does), with OpenCV's default threads and serial as the verifier's pool
makes it (`views.serial_opencv`).
Prints a table; asserts nothing (tests/test_views.py checks the bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone, uninstalled
sys.path.insert(0, str(ROOT / "tests"))  # the reference formulas

import reference_views as ref  # noqa: E402

from rescue.datasets.synthetic import SyntheticDataset  # noqa: E402
from rescue.models.chat import ImageEncoding  # noqa: E402
from rescue.models.views import (  # noqa: E402
    OverlayStyle,
    crop_box,
    draw_overlay,
    render_views,
    serial_opencv,
)
from rescue.models.workers import WorkerPool, cores  # noqa: E402

STYLE = OverlayStyle.from_config({"views": ["overlay", "crop"], "color": [255, 0, 0],
                                  "alpha": 0.4})
ENC = ImageEncoding(format="jpeg", quality=90)


def candidates(samples: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    ds = SyntheticDataset(num_samples=samples, seed=0, height=size, width=size)
    out = []
    for sid in ds.sample_ids():
        sample, scene = ds.load(sid), ds.scene(sid)
        for m in [sample.target, *(o.visible for o in scene.objects)]:
            u8 = m.astype(np.uint8)
            out.append((sample.image, m))
            for k in (5, 15):
                kernel = np.ones((k, k), np.uint8)
                out.append((sample.image, cv2.dilate(u8, kernel).astype(bool)))
                shrunk = cv2.erode(u8, kernel).astype(bool)
                if shrunk.any():
                    out.append((sample.image, shrunk))
    return out


def new_urls(image: np.ndarray, mask: np.ndarray) -> tuple[str, ...]:
    """`OpenAIVerifier.view_urls`."""
    return tuple(ENC.data_url(img) for _, img in render_views(image, mask, STYLE))


def pil_as_is(image: np.ndarray) -> str:
    """The RGB JPEG path before OpenCV encoded it: PIL's save, no conversion (same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=ENC.quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def old_urls(image: np.ndarray, mask: np.ndarray) -> tuple[str, ...]:
    return ref.view_urls(image, mask, STYLE, ENC)


def timed(fn: Callable[[], object], count: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per item of one call of `fn` over `count` items."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return ((time.process_time() - c0) * 1e3 / count, (time.perf_counter() - t0) * 1e3 / count)


def compare(name: str, jobs: dict[str, Callable[[], object]], count: int, rounds: int,
            base: str) -> None:
    """Alternating rounds of each job; a row each: CPU and wall per mask, ratio to `base`."""
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for fn in jobs.values():
        fn()  # warm: caches, OpenCV's thread pool
    for _ in range(rounds):
        for key, fn in jobs.items():
            runs[key].append(timed(fn, count))
    base_cpu = min(c for c, _ in runs[base])
    for key, r in runs.items():
        cpu, wall = min(c for c, _ in r), min(w for _, w in r)
        print(f"{name:<11} {key:<26} {cpu:7.3f} ({statistics.median(c for c, _ in r):6.3f})"
              f" {wall:7.3f} ({statistics.median(w for _, w in r):6.3f})"
              f" {base_cpu / cpu:6.2f}x")


def in_pool(fn: Callable[..., object], items: list[tuple[np.ndarray, np.ndarray]],
            initializer: Callable[[], None] | None = None) -> None:
    async def go() -> None:
        pool = WorkerPool("views-bench", initializer=initializer)
        try:
            await asyncio.gather(*(pool.run(fn, *it) for it in items))
        finally:
            pool.close()
    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    items = candidates(args.samples, args.size)
    n = len(items)
    drawn = [(draw_overlay(img, m, STYLE), m) for img, m in items]
    crops = []
    for ov, m in drawn:
        x1, y1, x2, y2 = crop_box(m, STYLE)
        crops.append(ov[y1:y2, x1:x2])
    views = [v for img, m in items for _, v in render_views(img, m, STYLE)]
    threads = cv2.getNumThreads()
    print(f"{n} masks on {args.samples} {args.size}x{args.size} synthetic images; "
          f"{os.cpu_count()} CPUs ({cores()} usable), OpenCV {cv2.__version__} with "
          f"{threads} threads, load {os.getloadavg()[0]:.1f}; views {list(STYLE.views)}, "
          f"JPEG q{ENC.quality}")
    print(f"{'stage':<11} {'code':<26} {'CPU ms/mask (median)':>20} {'wall ms (median)':>16}"
          f" {'CPU ×':>6}")

    def each(fn: Callable[..., object], args_list: list) -> Callable[[], object]:
        return lambda: [fn(*a) for a in args_list]

    def resize(crop: np.ndarray) -> np.ndarray:
        scale = STYLE.crop_size / max(crop.shape[:2])
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
        return cv2.resize(crop, size, interpolation=interp)

    compare("draw", {"old: float32 whole image": each(ref.draw_overlay,
                                                       [(i, m, STYLE) for i, m in items]),
                     "new: masked pixels only": each(draw_overlay,
                                                     [(i, m, STYLE) for i, m in items])},
            n, args.rounds, "old: float32 whole image")
    compare("crop_box", {"old: np.nonzero": each(ref.crop_box, [(m, STYLE) for _, m in items]),
                         "new: any() projections": each(crop_box,
                                                        [(m, STYLE) for _, m in items])},
            n, args.rounds, "old: np.nonzero")
    per_view = len(views) / n  # the encoding rows: both views of a mask, per mask
    try:
        serial_opencv()  # as in the verifier's pool: OpenCV's encoder would split its colour
        compare("encode", {  # conversion over 2 threads, PIL's has none
            "old: convert('RGB')": each(ref.data_url, [(ENC, v) for v in views]),
            "PIL, RGB as is": each(pil_as_is, [(v,) for v in views]),
            "new: OpenCV's encoder": each(ENC.data_url, [(v,) for v in views])},
            n, args.rounds, "old: convert('RGB')")
        print(f"{'':<11} ({per_view:.0f} views a mask, both encoded; OpenCV serial)")
        cv2.setNumThreads(threads)
        compare("resize", {f"cv2 {threads} threads": each(resize, [(c,) for c in crops]),
                           "cv2 1 thread": lambda: (cv2.setNumThreads(1),
                                                    [resize(c) for c in crops],
                                                    cv2.setNumThreads(threads))},
                n, args.rounds, f"cv2 {threads} threads")
        compare("view_urls", {"old": each(old_urls, items), "new": each(new_urls, items)},
                n, args.rounds, "old")

        def serial(job: Callable[[], object]) -> Callable[[], object]:
            def run() -> None:
                try:
                    job()
                finally:
                    cv2.setNumThreads(threads)
            return run

        compare("pool", {"old": lambda: in_pool(old_urls, items),
                         "new, cv2 default threads": lambda: in_pool(new_urls, items),
                         "new, serial_opencv": serial(lambda: in_pool(new_urls, items,
                                                                      serial_opencv))},
                n, args.rounds, "old")
    finally:
        cv2.setNumThreads(threads)
    print("view_urls: one mask at a time (OpenCV's default threads); pool: every mask at once "
          f"in a WorkerPool of {cores()} threads. At max_n 64 (~57 distinct masks a sample) "
          "multiply by 57 for the client CPU a sample.")


if __name__ == "__main__":
    main()
