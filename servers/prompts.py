"""Semantic checks of wire prompts against the image: finiteness, tolerance, clipping.

A planner's box often pokes a few pixels out of the image (rounding of 0–1000 coordinates);
that is clipped. A box far outside the image is a wrong answer, not a rounding error, and is
reported rather than silently shrunk to a sliver on the border.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rescue.hypothesis import Prompt
from rescue.models.grounding import MIN_BOX_PX
from servers.protocol import PromptIn

MIN_SIDE_PX = MIN_BOX_PX
"""A box narrower or shorter than this after clipping is degenerate: the planner's limit too
(`rescue.models.grounding.MIN_BOX_PX`), so the server never refuses a box the planner kept."""


class PromptInvalid(ValueError):
    """A prompt that cannot be segmented; the message says why, for the client."""


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def validate_prompt(p: PromptIn, width: int, height: int, tolerance: float,
                    max_points: int) -> Prompt:
    """The clipped `Prompt` for `p` on a width×height image, or `PromptInvalid`.

    A coordinate may lie outside the image by at most `tolerance` × the image side along its
    axis (x against width, y against height); within that it is clipped to the image.
    """
    tx, ty = tolerance * width, tolerance * height
    text = " ".join(p.text.split()) if p.text else ""
    text = text or None  # whitespace-only text is no text

    def check_xy(x: float, y: float, what: str) -> None:
        if not (-tx <= x <= width + tx and -ty <= y <= height + ty):
            raise PromptInvalid(
                f"{what} ({x:g}, {y:g}) lies outside the {width}x{height} image by more than "
                f"the tolerance ({tolerance:g} of the side)")

    box = None
    if p.box is not None:
        if len(p.box) != 4:
            raise PromptInvalid(f"box must have 4 numbers [x1, y1, x2, y2], got {len(p.box)}")
        if not _finite(p.box):
            raise PromptInvalid(f"box has a non-finite coordinate: {p.box}")
        x1, y1, x2, y2 = (float(v) for v in p.box)
        if not (x2 > x1 and y2 > y1):
            raise PromptInvalid(f"box must have x2 > x1 and y2 > y1, got {[x1, y1, x2, y2]}")
        check_xy(x1, y1, "box corner")
        check_xy(x2, y2, "box corner")
        cx1, cx2 = _clip(x1, width), _clip(x2, width)
        cy1, cy2 = _clip(y1, height), _clip(y2, height)
        if cx2 - cx1 < MIN_SIDE_PX or cy2 - cy1 < MIN_SIDE_PX:
            raise PromptInvalid(f"box {[x1, y1, x2, y2]} is under {MIN_SIDE_PX:g} px wide or high "
                                f"after clipping to the {width}x{height} image")
        box = (cx1, cy1, cx2, cy2)

    if len(p.points) > max_points:
        raise PromptInvalid(f"{len(p.points)} points, at most {max_points} allowed")
    if len(p.point_labels) != len(p.points):
        raise PromptInvalid(f"{len(p.points)} points but {len(p.point_labels)} point_labels")
    points = []
    for pt in p.points:
        if len(pt) != 2:
            raise PromptInvalid(f"a point must be [x, y], got {pt}")
        if not _finite(pt):
            raise PromptInvalid(f"point has a non-finite coordinate: {pt}")
        x, y = float(pt[0]), float(pt[1])
        check_xy(x, y, "point")
        # a pixel index: clip into [0, side - 1] so the point names an existing pixel
        points.append((_clip(x, width - 1.0), _clip(y, height - 1.0)))
    for lab in p.point_labels:
        if lab not in (0, 1):
            raise PromptInvalid(f"point_labels must be 1 (foreground) or 0 (background), "
                                f"got {lab}")

    if text is None and box is None and not points:
        raise PromptInvalid("empty prompt: give text, a box or points")
    return Prompt(text=text, box=box, points=tuple(points),
                  point_labels=tuple(int(v) for v in p.point_labels))
