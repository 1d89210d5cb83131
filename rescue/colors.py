"""Colours told apart by eye: distances in CIELAB, where equal steps look about equally different.

Plots give a selector without a colour of its own the palette colour farthest from every colour
already on the plot; overlays for people tint a mask in the palette colour farthest from the
pixels under and around it. Pure functions of numbers, so the same inputs always pick the same
colour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

RGB = tuple[int, int, int]

PALETTE: tuple[RGB, ...] = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (255, 255, 255),
)
"""Sasha Trubetskoy's 20 distinct colours, black first and white last."""

_M = np.array([[0.4124564, 0.3575761, 0.1804375],
               [0.2126729, 0.7151522, 0.0721750],
               [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def lab(rgb: Sequence[float] | np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in 0..255, shape (..., 3) -> (..., 3)."""
    c = np.asarray(rgb, dtype=float) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (c @ _M.T) / _WHITE
    d = 6.0 / 29.0
    f = np.where(t > d ** 3, np.cbrt(t), t / (3 * d * d) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def hex_rgb(color: str) -> RGB:
    """`#1f77b4` -> (31, 119, 180)."""
    h = color.lstrip("#")
    if len(h) != 6:
        raise ValueError(f"expected a colour as #rrggbb, got {color!r}")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def rgb_hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def farthest(candidates: Sequence[RGB], away_from: Iterable[Sequence[float]]) -> int:
    """The index of the candidate whose nearest `away_from` colour is farthest (CIELAB); ties
    to the earliest. With nothing to keep away from, the first candidate."""
    away = np.asarray(list(away_from), dtype=float).reshape(-1, 3)
    if not len(candidates):
        raise ValueError("no candidate colours")
    if not len(away):
        return 0
    dist = np.linalg.norm(lab(candidates)[:, None, :] - lab(away)[None, :, :], axis=-1)
    return int(np.argmax(dist.min(axis=1)))


def distinct(count: int, taken: Iterable[Sequence[float]], *, max_lightness: float = 70.0,
             palette: Sequence[RGB] = PALETTE) -> list[RGB]:
    """`count` palette colours, each in turn the farthest from `taken` and those picked before
    it, none lighter than `max_lightness` (L*: lines readable on white). Never a taken colour
    while the palette has an untaken one; past that the palette repeats."""
    pool = [c for c in palette if lab(c)[0] <= max_lightness]
    seen = [tuple(float(v) for v in t) for t in taken]
    out: list[RGB] = []
    for _ in range(count):
        free = [c for c in pool if tuple(map(float, c)) not in seen] or pool
        pick = free[farthest(free, seen)]
        out.append(pick)
        seen.append(tuple(map(float, pick)))
    return out


def stands_out(preferred: RGB, away_from: Iterable[Sequence[float]], *, min_delta: float = 35.0,
               palette: Sequence[RGB] = PALETTE[1:-1]) -> RGB:
    """`preferred` where it is at least `min_delta` (CIELAB ΔE) from every `away_from` colour
    (a legend keeps its usual colours), else the palette colour farthest from them."""
    away = [tuple(float(v) for v in a) for a in away_from]
    if not away:
        return preferred
    gap = np.linalg.norm(lab(away) - lab(preferred), axis=-1).min()
    return preferred if gap >= min_delta else palette[farthest(palette, away)]

