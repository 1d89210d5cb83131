"""A classical executor: OpenCV GrabCut from a box (and optional points); needs no weights.

It stands in for SAM3 where no GPU or weights exist (the CPU demo, the tests, the SAM server's
`classical` backend). It reads only the image and the prompt, never the ground truth, so it is
not simulated: its masks are real (if modest) segmentations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from rescue import masks
from rescue.cost import Cost, with_cost
from rescue.hypothesis import Prompt
from rescue.models.grounding import MIN_BOX_PX
from rescue.priority import Slots
from rescue.protocols import Segmentation
from rescue.sample import Box, Sample

MIN_GRABCUT_PX = 64
"""Below this many pixels in the (working-scale) box GrabCut's 5-component GMMs cannot be fit;
the box itself is returned as the mask instead."""


MIN_PART = 0.2
"""A connected part of GrabCut's foreground is kept when at least this fraction of the largest."""


COLOUR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 210, 50),
    "green": (40, 160, 60), "blue": (40, 80, 220), "purple": (140, 60, 180),
    "pink": (240, 140, 180), "brown": (140, 90, 50), "black": (20, 20, 20),
    "white": (240, 240, 240), "grey": (128, 128, 128), "gray": (128, 128, 128),
}
"""Prototype sRGB colours of basic colour terms (generic, not any dataset's palette)."""

_RELATION = re.compile(r"\b(left of|right of|above|below|under|over|behind|near|next to|beside|"
                       r"between|in front of|on top of|on|with|of|to|from|that|which)\b")


def _lab(rgb: np.ndarray) -> np.ndarray:
    px = np.clip(np.asarray(rgb, np.float32).reshape(1, -1, 3) / 255.0, 0, 1)
    return cv2.cvtColor(px, cv2.COLOR_RGB2LAB).reshape(-1, 3)


_COLOUR_LAB = _lab(np.array(list(COLOUR_WORDS.values())))


def head_colour(text: str | None) -> str | None:
    """The colour word describing the phrase's head object: the first one before any relation
    word ("the red star left of the blue circle" -> red; "the shape above the red star" -> None).
    """
    if not text:
        return None
    head = _RELATION.split(text.lower(), maxsplit=1)[0]
    for word in re.findall(r"[a-z]+", head):
        if word in COLOUR_WORDS:
            return word
    return None


def colour_agreement(pixels: np.ndarray, colour: str, tau: float = 15.0) -> float:
    """In (0, 1]: 1 when `colour` is the basic colour term nearest (CIELAB) to the pixels' mean,
    decaying with how much farther it is than the nearest one.

    The one bit of the query a box-and-colour segmenter can check; it lets the executor's score
    prefer a clean mask *of the named colour* over a cleaner mask of another object.
    """
    if pixels.size == 0:
        return 0.0
    d = np.linalg.norm(_COLOUR_LAB - _lab(pixels.reshape(-1, 3).mean(0)), axis=1)
    gap = float(d[list(COLOUR_WORDS).index(colour)] - d.min())
    return float(np.exp(-gap / tau))


def _clip_box(box: Box, width: int, height: int) -> tuple[float, float, float, float] | None:
    vals = [float(v) for v in box]
    if not all(np.isfinite(vals)):
        return None
    x1, y1, x2, y2 = vals
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
        return None
    return x1, y1, x2, y2


def _points_box(points: Sequence[tuple[float, float]], width: int, height: int) -> Box:
    """A box around positive points, padded so an object of moderate size fits in it."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    pad = 0.15 * max(width, height)
    return min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad


def _error(prompt: Prompt, reason: str) -> Segmentation:
    return Segmentation(rle=None, error=reason, meta={"prompt": prompt.to_json()})


def _separation(work: np.ndarray, fg: np.ndarray) -> float:
    """How distinct the mask's colours are from a ring of pixels just outside it, in [0, 1).

    d = |mean_fg - mean_ring| / sqrt(var_fg + var_ring + 1) (RGB, variances summed over
    channels); returned as d / (1 + d). A clean object on a differently coloured background
    scores near 1; a mask that leaked into texture or covers half of two objects scores low.
    """
    k = max(3, 2 * (max(work.shape[:2]) // 40) + 1)
    ring = cv2.dilate(fg.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool) & ~fg
    if not fg.any() or not ring.any():
        return 0.0
    a = work[fg].astype(np.float64)
    b = work[ring].astype(np.float64)
    diff = float(np.linalg.norm(a.mean(0) - b.mean(0)))
    spread = float(np.sqrt(a.var(0).sum() + b.var(0).sum() + 1.0))
    d = diff / spread
    return d / (1.0 + d)


def _truncation(fg: np.ndarray, box: tuple[int, int, int, int],
                crop_shape: tuple[int, int]) -> float:
    """Fraction of the box's inner border covered by the mask (sides on the image edge excluded).

    A mask that runs along the box edge is likely an object the box cut in half.
    """
    x1, y1, x2, y2 = box
    h, w = crop_shape
    sides = []
    if y1 > 0:
        sides.append(fg[y1, x1:x2])
    if y2 < h:
        sides.append(fg[y2 - 1, x1:x2])
    if x1 > 0:
        sides.append(fg[y1:y2, x1])
    if x2 < w:
        sides.append(fg[y1:y2, x2 - 1])
    if not sides:
        return 0.0
    edge = np.concatenate(sides)
    return float(edge.mean()) if edge.size else 0.0


def _keep_components(fg: np.ndarray, seeds: Sequence[tuple[int, int]],
                     vetoes: Sequence[tuple[int, int]] = (), reach: int = 3) -> np.ndarray:
    """Components of at least `MIN_PART` of the largest one, plus any holding a positive point,
    minus any within `reach` px of a negative point (unless a positive point holds it too).

    GrabCut often adds specks of similarly coloured texture; a referring target is one blob or
    a few comparable ones (a box around "all green shapes"), or the blobs a user pointed at. A
    negative click only pins a small disc to background, and GrabCut keeps the rest of a blob
    whose colour the foreground model likes; the user meant "not that object", so it goes.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return fg
    h, w = fg.shape
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = {int(i) + 1 for i in np.flatnonzero(areas >= MIN_PART * areas.max())}
    pinned = {int(labels[y, x]) for x, y in seeds if 0 <= y < h and 0 <= x < w} - {0}
    vetoed: set[int] = set()
    for x, y in vetoes:
        window = labels[max(0, y - reach):y + reach + 1, max(0, x - reach):x + reach + 1]
        vetoed |= {int(v) for v in np.unique(window)} - {0}
    keep = (keep | pinned) - (vetoed - pinned)
    return np.isin(labels, sorted(keep))


def grabcut_segment(image: np.ndarray, prompt: Prompt, iterations: int = 5,
                    max_side: int = 512, context: float = 0.5,
                    slack: float = 0.3, colour_prior: bool = True) -> Segmentation:
    """Segment what `prompt`'s box (or points) outlines with GrabCut.

    Initialisation is GC_INIT_WITH_RECT's (inside the box = probable foreground, outside = sure
    background) written as an initial mask, with two changes: a band of `slack` × the box size
    just outside the box is only *probable* background, so an object the box clips slightly is
    recovered instead of being learnt as background (with slack 0 a box 8% too tight loses the
    whole object in ~1 case in 10); and points paint discs, label 1 sure foreground, label 0 sure
    background (and the blob a negative point lands on is dropped, see `_keep_components`).
    Points without a box get a padded box around the positive points. Only a crop
    around the box (`context` × its size on each side: the local background GrabCut models) is
    processed, downscaled so its long side is at most `max_side`; the mask is upsampled back.
    When GrabCut keeps nothing (a flat crop, a negative point on the only blob) the answer is an
    empty mask with score 0 and box None: "nothing here" is a result, not an error.

    Score in [0, 1]: separation × (1 − truncation) × colour, where separation measures how
    distinct the mask's colours are from the ring just outside it (see `_separation`),
    truncation is the fraction of the box border the mask runs along, and colour (with
    `colour_prior`, when the prompt's phrase names a colour for its head object) is how well the
    mask's mean colour fits that word (`colour_agreement`), else 1. High means "a clean,
    distinct object that the box encloses, of the colour asked for"; beyond a colour word it
    does not know which object the query meant.
    """
    height, width = image.shape[:2]
    positives = [p for p, lab in zip(prompt.points, prompt.point_labels, strict=False) if lab == 1]
    if prompt.box is None and not positives:
        if prompt.points:
            return _error(prompt, "prompt:no_positive classical executor needs a box or a "
                                  "positive point; got only negative points")
        return _error(prompt, "prompt:text_only classical executor needs a box or points; "
                              f"got the phrase {prompt.text!r} alone")
    raw_box = prompt.box if prompt.box is not None else _points_box(positives, width, height)
    box = _clip_box(raw_box, width, height)
    if box is None:
        return _error(prompt, f"box:degenerate after clipping to the {width}x{height} image: "
                              f"{tuple(round(float(v), 2) for v in raw_box)}")

    bx1, by1, bx2, by2 = box
    mx, my = context * (bx2 - bx1), context * (by2 - by1)
    cx1, cy1 = int(max(0, np.floor(bx1 - mx))), int(max(0, np.floor(by1 - my)))
    cx2, cy2 = int(min(width, np.ceil(bx2 + mx))), int(min(height, np.ceil(by2 + my)))
    crop = np.ascontiguousarray(image[cy1:cy2, cx1:cx2])
    ch, cw = crop.shape[:2]
    scale = min(1.0, max_side / max(ch, cw))
    if scale < 1.0:
        work = cv2.resize(crop, (max(1, round(cw * scale)), max(1, round(ch * scale))),
                          interpolation=cv2.INTER_AREA)
    else:
        work = crop
    wh, ww = work.shape[:2]
    sx, sy = ww / cw, wh / ch

    # the box in working coordinates, at least one pixel
    wx1 = min(ww - 1, int(np.floor((bx1 - cx1) * sx)))
    wy1 = min(wh - 1, int(np.floor((by1 - cy1) * sy)))
    wx2 = max(wx1 + 1, min(ww, int(np.ceil((bx2 - cx1) * sx))))
    wy2 = max(wy1 + 1, min(wh, int(np.ceil((by2 - cy1) * sy))))

    init = np.full((wh, ww), cv2.GC_BGD, np.uint8)
    if slack > 0:
        sx_, sy_ = round(slack * (wx2 - wx1)), round(slack * (wy2 - wy1))
        init[max(0, wy1 - sy_):wy2 + sy_, max(0, wx1 - sx_):wx2 + sx_] = cv2.GC_PR_BGD
    init[wy1:wy2, wx1:wx2] = cv2.GC_PR_FGD
    if not (init == cv2.GC_BGD).any():
        # the box is the whole crop (it fills the image): assume the frame is background
        init[0, :] = init[-1, :] = init[:, 0] = init[:, -1] = cv2.GC_PR_BGD
    radius = max(2, round(0.02 * max(wh, ww)))
    seeds: list[tuple[int, int]] = []
    vetoes: list[tuple[int, int]] = []
    for (px, py), lab in zip(prompt.points, prompt.point_labels, strict=False):
        if not (np.isfinite(px) and np.isfinite(py)):
            continue
        x, y = round((px - cx1) * sx), round((py - cy1) * sy)
        if not (0 <= x < ww and 0 <= y < wh):
            continue
        cv2.circle(init, (x, y), radius, cv2.GC_FGD if lab == 1 else cv2.GC_BGD, -1)
        (seeds if lab == 1 else vetoes).append((x, y))

    n_fg = int(np.isin(init, (cv2.GC_FGD, cv2.GC_PR_FGD)).sum())
    n_bg = int(np.isin(init, (cv2.GC_BGD, cv2.GC_PR_BGD)).sum())
    meta: dict[str, Any] = {"work_size": [wh, ww], "crop": [cx1, cy1, cx2, cy2]}
    if n_fg < MIN_GRABCUT_PX or n_bg < MIN_GRABCUT_PX:
        fg = np.zeros((wh, ww), bool)
        fg[wy1:wy2, wx1:wx2] = True
        meta["fallback"] = "box too small for GrabCut; mask is the box"
        score_scale = 0.1
    else:
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        # GrabCut seeds its colour models by k-means on OpenCV's per-thread RNG: reseed it so
        # the mask depends on the prompt alone, not on what the worker thread did before
        cv2.setRNGSeed(0)
        cv2.grabCut(work, init, None, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_MASK)
        fg = np.isin(init, (cv2.GC_FGD, cv2.GC_PR_FGD))
        fg = _keep_components(fg, seeds, vetoes, radius + 2)
        score_scale = 1.0

    score = score_scale * _separation(work, fg) * (1.0 - _truncation(fg, (wx1, wy1, wx2, wy2),
                                                                      (wh, ww)))
    colour = head_colour(prompt.text) if colour_prior else None
    if colour is not None:
        agreement = colour_agreement(work[fg], colour)
        score *= agreement
        meta["colour"] = {"word": colour, "agreement": round(agreement, 4)}
    if scale == 1.0:
        fg_crop = fg
    elif fg.any():
        up = cv2.resize(fg.astype(np.float32), (cw, ch), interpolation=cv2.INTER_LINEAR)
        fg_crop = up >= 0.5
    else:  # nothing found in a downscaled crop: an empty mask at crop size, not the work size
        fg_crop = np.zeros((ch, cw), bool)
    full = np.zeros((height, width), bool)
    full[cy1:cy2, cx1:cx2] = fg_crop
    meta["box_fill"] = float(full.sum()) / max(1.0, (bx2 - bx1) * (by2 - by1))
    return Segmentation(rle=masks.encode(full), score=float(round(score, 6)),
                        box=masks.bbox(full), meta=meta)


class ClassicalExecutor:
    """Executor protocol over `grabcut_segment`, run in worker threads (OpenCV releases the GIL)."""

    simulated = False

    def __init__(self, iterations: int = 5, max_side: int = 512, max_concurrency: int = 2,
                 context: float = 0.5, slack: float = 0.3, colour_prior: bool = True) -> None:
        if iterations < 1 or max_side < 8 or max_concurrency < 1 or context < 0 or slack < 0:
            raise ValueError("iterations >= 1, max_side >= 8, max_concurrency >= 1, "
                             "context >= 0 and slack >= 0 required")
        self.iterations = int(iterations)
        self.max_side = int(max_side)
        self.context = float(context)
        self.slack = float(slack)
        self.colour_prior = bool(colour_prior)
        self.max_concurrency = int(max_concurrency)
        self._slots = Slots(self.max_concurrency)

    def identity(self) -> Mapping[str, Any]:
        return {"backend": "grabcut", "iterations": self.iterations, "max_side": self.max_side,
                "context": self.context, "slack": self.slack, "colour_prior": self.colour_prior,
                "opencv": cv2.__version__}

    async def _one(self, image: np.ndarray, prompt: Prompt) -> Segmentation:
        async with self._slots():
            try:
                return await asyncio.to_thread(grabcut_segment, image, prompt,
                                               self.iterations, self.max_side, self.context,
                                               self.slack, self.colour_prior)
            except Exception as exc:  # one bad prompt never fails the others
                return _error(prompt, f"execute:grabcut_failed {type(exc).__name__}: {exc}")

    async def segment(self, sample: Sample, prompts: Sequence[Prompt]) -> list[Segmentation]:
        """Its cost counts the work (a prompt each; the call on the first), not its seconds: an
        in-process CPU backend's time says nothing of a GPU's, and a run stays reproducible."""
        segs = await asyncio.gather(*(self._one(sample.image, p) for p in prompts))
        return [dataclasses.replace(s, meta=with_cost(s.meta, Cost(prompts=1, calls=int(k == 0))))
                for k, s in enumerate(segs)]
