"""Draw a candidate mask over the image so a VLM can judge it.

The verifier sees the mask, not numbers: a translucent tint plus a solid outline (the tint
shows extent, the outline shows the boundary where the tint is faint on similar colours).
Small objects are hard to judge at full-image scale, so an optional zoomed crop around the mask
is a second view (SAM 3 Agent checks masks the same way). Which views are sent is configuration,
and the prompt is told what each one shows (`describe`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from rescue import colors
from rescue.colors import RGB
from rescue.models.http import plain

VIEWS = ("overlay", "crop", "image")

_DESCRIPTIONS = {
    "overlay": "the whole image with the candidate region tinted {color} and outlined",
    "crop": "a zoomed-in view around the candidate region (same tint and outline)",
    "image": "the original image without any marking",
}


@dataclass(frozen=True)
class OverlayStyle:
    views: tuple[str, ...] = ("overlay",)
    color: tuple[int, int, int] = (255, 0, 0)
    color_name: str = "red"
    alpha: float = 0.4
    outline_px: int | None = None  # None: about 0.4% of the longer side, at least 2 px
    crop_context: float = 0.5  # context added around the mask box, as a fraction of its size
    crop_min_px: int = 32  # the crop is at least this large (in source pixels)
    crop_size: int = 512  # the crop is resized so its longer side is this (zoom for small masks)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | OverlayStyle | None) -> OverlayStyle:
        if isinstance(cfg, OverlayStyle):
            return cfg
        d = dict(plain(cfg) or {})
        if "views" in d:
            d["views"] = tuple(d["views"])
        if "color" in d:
            d["color"] = tuple(int(c) for c in d["color"])
        style = cls(**d)
        bad = [v for v in style.views if v not in VIEWS]
        if bad or not style.views:
            raise ValueError(f"overlay.views must be a non-empty list from {VIEWS}, got "
                             f"{list(style.views)}")
        if not 0.0 <= style.alpha <= 1.0:
            raise ValueError(f"overlay.alpha must be in [0, 1], got {style.alpha}")
        return style

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["views"] = list(self.views)
        d["color"] = list(self.color)
        d["extra"] = dict(self.extra)
        return d


def _outline(shape: tuple[int, int], style: OverlayStyle) -> int:
    if style.outline_px is not None:
        return max(1, int(style.outline_px))
    return max(2, round(0.004 * max(shape)))


def _tinted(px: np.ndarray, style: OverlayStyle) -> np.ndarray:
    """float32 pixels blended towards the tint colour by `alpha` (this order of float32
    operations: the views' bytes are the verifier's cache keys)."""
    return (1.0 - style.alpha) * px + style.alpha * np.array(style.color, dtype=np.float32)


def _rounded(px: np.ndarray) -> np.ndarray:
    """float32 pixels rounded (half up) to uint8. A uint8 pixel left untinted comes back as it
    was (v + 0.5 truncates to v, 255.5 clips to 255), which is why `draw_overlay` converts only
    the masked pixels of a uint8 image: the same bytes for a fraction of the work."""
    return np.clip(px + 0.5, 0, 255).astype(np.uint8)


def draw_overlay(image: np.ndarray, mask: np.ndarray, style: OverlayStyle, *,
                 halo: RGB | None = None) -> np.ndarray:
    """The image with `mask` tinted and outlined; a copy, (H, W, 3) uint8. `halo`: the outline
    is edged in this colour too (for people: `draw_contrasting`; what a verifier sees has none,
    so its images, and the cache keys made of them, stay as configured)."""
    m = np.asarray(mask, dtype=bool)
    if m.shape != image.shape[:2]:
        raise ValueError(f"mask shape {m.shape} != image shape {image.shape[:2]}")
    if image.dtype == np.uint8:  # tint only the masked pixels: elsewhere the formula is exact
        out = np.array(image, order="C")
        px = out.reshape(m.size, -1)  # a view: pixels in the order of m's flat indices
        at = np.flatnonzero(m)  # integer indices: several times faster than out[m]
        px[at] = _rounded(_tinted(px.take(at, axis=0).astype(np.float32), style))
    else:
        out = image.astype(np.float32)
        out[m] = _tinted(out[m], style)
        out = _rounded(out)
    if m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        width = _outline(m.shape, style)
        if halo is not None:
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in halo), 2 * width + 2)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in style.color), width)
    return out


def region_colors(image: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The mean colour under `mask` and in a ring around it (a few percent of the image's
    longer side wide): what a tint and an outline must stand out from. Empty parts are left
    out; an empty mask gives the whole image's mean."""
    m = np.asarray(mask, dtype=bool)
    px = np.asarray(image, dtype=float).reshape(-1, 3)
    if not m.any():
        return [px.mean(axis=0)]
    r = max(3, round(0.03 * max(m.shape)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    ring = cv2.dilate(m.astype(np.uint8), kernel).astype(bool) & ~m
    return [px[part.ravel()].mean(axis=0) for part in (m, ring) if part.any()]


def contrasting_style(image: np.ndarray, mask: np.ndarray,
                      style: OverlayStyle = OverlayStyle()) -> tuple[OverlayStyle, RGB]:
    """`style` in the palette colour farthest (CIELAB) from the pixels under and around the
    mask, and the halo for its outline: black or white, whichever the surroundings are
    farther from. Red on a red car is invisible; this never picks it."""
    around = region_colors(image, mask)
    fills = colors.PALETTE[1:-1]  # tints of black or white are no colour
    fill = fills[colors.farthest(fills, around)]
    edges = (colors.PALETTE[0], colors.PALETTE[-1])
    halo = edges[colors.farthest(edges, around[-1:])]
    return replace(style, color=fill, color_name=colors.rgb_hex(fill)), halo


def draw_contrasting(image: np.ndarray, mask: np.ndarray,
                     style: OverlayStyle = OverlayStyle()) -> np.ndarray:
    """`draw_overlay` for people (inference's overlay.png and candidates.png): the tint and
    the outline's halo chosen from the image (`contrasting_style`)."""
    chosen, halo = contrasting_style(image, mask, style)
    return draw_overlay(image, mask, chosen, halo=halo)


def crop_box(mask: np.ndarray, style: OverlayStyle) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the zoom view: the mask's box grown by `crop_context`, or None for an
    empty mask. The box comes from the mask's row and column projections (`any`), several
    times faster than listing every pixel with `np.nonzero`."""
    m = np.asarray(mask)
    rows = m.any(axis=1)
    if not rows.any():
        return None
    cols = m.any(axis=0)
    h, w = m.shape
    y1, y2 = int(rows.argmax()), h - int(rows[::-1].argmax())
    x1, x2 = int(cols.argmax()), w - int(cols[::-1].argmax())
    side = max(x2 - x1, y2 - y1)
    pad = style.crop_context * side
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half_w = max((x2 - x1) / 2.0 + pad, style.crop_min_px / 2.0)
    half_h = max((y2 - y1) / 2.0 + pad, style.crop_min_px / 2.0)
    bx1, bx2 = max(0, int(np.floor(cx - half_w))), min(w, int(np.ceil(cx + half_w)))
    by1, by2 = max(0, int(np.floor(cy - half_h))), min(h, int(np.ceil(cy + half_h)))
    return bx1, by1, bx2, by2


def serial_opencv() -> None:
    """OpenCV runs each call on its calling thread: `cv2.setNumThreads(1)`, which is
    process-wide, not per thread. The verifier's WorkerPool runs this as each of its threads
    starts (so only a process with a real verifier changes it, when its pool first starts). That
    pool already spreads the views over the cores; OpenCV's own pool on top (the zoom's resize is
    its one parallel call here) only oversubscribes them: measured on 2 cores
    (benchmarks/bench_views.py), a view's resize takes ~1.2 ms of CPU serial against ~1.6 ms
    with OpenCV's 2 threads, every mask's views in the pool ~10% less CPU, the wall equal.
    Results do not change: OpenCV's parallel loops split rows that are computed
    independently (tests/test_views.py checks the bytes)."""
    cv2.setNumThreads(1)


def render_views(image: np.ndarray, mask: np.ndarray,
                 style: OverlayStyle) -> list[tuple[str, np.ndarray]]:
    """The configured views, in order. An empty mask has no crop view (the full overlay is
    sent in its place, so the number of images stays what the prompt describes)."""
    overlay = draw_overlay(image, mask, style)
    views: list[tuple[str, np.ndarray]] = []
    for name in style.views:
        if name == "overlay":
            views.append((name, overlay))
        elif name == "image":
            views.append((name, np.ascontiguousarray(image)))
        else:
            box = crop_box(np.asarray(mask, dtype=bool), style)
            if box is None:
                views.append((name, overlay))
                continue
            x1, y1, x2, y2 = box
            crop = overlay[y1:y2, x1:x2]
            scale = style.crop_size / max(crop.shape[:2])
            size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
            interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            views.append((name, cv2.resize(crop, size, interpolation=interp)))
    return views


MARK_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))
"""Set-of-Marks: one distinct colour per numbered mask (Sasha Trubetskoy's palette)."""


def draw_marks(image: np.ndarray, marks: Sequence[np.ndarray], style: OverlayStyle) -> np.ndarray:
    """The image with each mask tinted and outlined in its own colour and its number (1, 2, ...)
    written at the mask's most interior pixel: Set-of-Marks prompting's one image."""
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    scale = max(0.4, max(h, w) / 800)
    for k, mask in enumerate(marks):
        color = MARK_COLORS[k % len(MARK_COLORS)]
        out = draw_overlay(out, mask, replace(style, color=color))
        m = np.asarray(mask, bool)
        if not m.any():
            continue
        dist = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        label = str(k + 1)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
        x0, y0 = int(min(max(0, x - tw // 2), w - tw)), int(min(max(th, y + th // 2), h - 1))
        cv2.rectangle(out, (x0 - 2, y0 - th - 2), (x0 + tw + 2, y0 + 3), (0, 0, 0), -1)
        cv2.putText(out, label, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 2,
                    cv2.LINE_AA)
    return out


def describe_marks(count: int) -> str:
    """The `{views}` sentence of the Set-of-Marks image."""
    return (f"The image shows {count} candidate regions, each tinted in its own colour, "
            f"outlined, and labelled with its number from 1 to {count}.")


def describe_candidates(views: Sequence[str], count: int, color_name: str = "red") -> str:
    """The `{views}` sentence when `count` candidates are shown one after the other, each with
    the same views (the pairwise arena: 2)."""
    k = len(views)
    parts = [f"Images {c * k + 1}-{c * k + k} show candidate {c + 1}:" if k > 1 else
             f"Image {c + 1} shows candidate {c + 1}:" for c in range(count)]
    each = "; ".join(_DESCRIPTIONS[v].format(color=color_name) for v in views)
    return " ".join(parts) + f" (each: {each})."


def describe(views: Sequence[str], color_name: str = "red") -> str:
    """A sentence per image for the prompt's `{views}` placeholder."""
    if len(views) == 1:
        return "The image shows " + _DESCRIPTIONS[views[0]].format(color=color_name) + "."
    parts = [f"Image {i + 1} shows " + _DESCRIPTIONS[v].format(color=color_name) + "."
             for i, v in enumerate(views)]
    return " ".join(parts)
