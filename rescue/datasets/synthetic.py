"""Synthetic referring-segmentation scenes: coloured shapes on a textured background.

The CPU demo and the tests need a dataset that exists without a download, has exact ground
truth, and asks queries that need reasoning (attributes, spatial relations, comparisons, several
targets). Every sample is a pure function of (seed, index, config): `load` regenerates it, in any
order, bit for bit.

Each query is guaranteed unambiguous: the generator enumerates the queries a scene supports and
keeps only those whose intended set is the only one that matches, with margins (areas differ by
`AREA_RATIO`, positions by `POSITION_MARGIN` of the image side) so that a human would agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from rescue import masks
from rescue.datasets.base import SampleError
from rescue.sample import IGNORE, Box, Sample

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 210, 45),
    "purple": (145, 60, 185),
}
AREA_RATIO = 1.35
"""'largest'/'smallest' hold only when the target's visible area beats every rival's by this."""
POSITION_MARGIN = 0.04
"""Spatial words hold only with this gap (fraction of the image side) to every rival."""
MIN_VISIBLE = 0.75
"""Every object keeps at least this fraction of its pixels visible (occlusion stays mild)."""

QUERY_KINDS = ("attribute", "comparative", "relation", "extreme", "multi")
QUERY_WEIGHTS = (0.15, 0.30, 0.20, 0.12, 0.23)


@dataclass(frozen=True)
class Difficulty:
    """Scene knobs: pixel noise (std, grey levels), background texture amplitude, colour jitter,
    allowed overlap (fraction of the smaller object) and object size range (fraction of the
    shorter image side, as the shape's circumradius)."""

    noise: float
    texture: float
    colour_jitter: float
    max_overlap: float
    min_size: float
    max_size: float


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(noise=5, texture=12, colour_jitter=8, max_overlap=0.0,
                       min_size=0.08, max_size=0.16),
    "medium": Difficulty(noise=12, texture=28, colour_jitter=15, max_overlap=0.08,
                         min_size=0.06, max_size=0.15),
    "hard": Difficulty(noise=22, texture=45, colour_jitter=25, max_overlap=0.15,
                       min_size=0.05, max_size=0.14),
}


@dataclass(frozen=True, eq=False)
class SceneObject:
    shape: str
    colour: str
    visible: np.ndarray  # (H, W) bool: the pixels of this object left after occlusion
    # area, centroid and box are computed once: the query generators ask for them in nested
    # loops over every pair of objects (most of a scene's CPU when they were recomputed)

    @functools.cached_property
    def area(self) -> int:
        return int(self.visible.sum())

    @functools.cached_property
    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.visible)
        return float(xs.mean()), float(ys.mean())

    @functools.cached_property
    def box(self) -> Box:
        b = masks.bbox(self.visible)
        assert b is not None  # MIN_VISIBLE guarantees pixels
        return b


@dataclass(frozen=True)
class Query:
    text: str
    targets: tuple[int, ...]  # indices into Scene.objects
    kind: str  # one of QUERY_KINDS


@dataclass(frozen=True, eq=False)
class Scene:
    image: np.ndarray
    objects: tuple[SceneObject, ...]
    query: Query


# ---- rendering -------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if shape == "square":
        ts = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in ts]
    elif shape == "triangle":
        ts = [angle - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in ts]
    elif shape == "star":
        pts = []
        for k in range(10):
            t = angle - math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    else:
        raise ValueError(f"no polygon for {shape!r}")
    return np.round(np.array(pts) * 16).astype(np.int32)  # 4 fractional bits


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float,
                height: int, width: int) -> np.ndarray:
    m = np.zeros((height, width), np.uint8)
    if shape == "circle":
        cv2.circle(m, (round(cx * 16), round(cy * 16)), round(r * 16), 1, -1, cv2.LINE_8, 4)
    else:
        cv2.fillPoly(m, [_polygon(shape, cx, cy, r, angle)], 1, cv2.LINE_8, 4)
    return m.astype(bool)


def _background(rng: np.random.Generator, height: int, width: int, d: Difficulty) -> np.ndarray:
    """Muted base colour + linear gradient + oriented stripes + blotches: enough texture that
    GrabCut's colour models have to work, never so saturated that it looks like a shape."""
    base = rng.uniform(95, 165) + rng.uniform(-18, 18, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(theta) * xx / width + np.sin(theta) * yy / height)
    img = base[None, None, :] + 30.0 * ramp[..., None] * rng.uniform(-1, 1, size=3)
    phi = rng.uniform(0, math.pi)
    period = rng.uniform(10, 28)
    stripes = np.sin(2 * math.pi * (np.cos(phi) * xx + np.sin(phi) * yy) / period)
    img += d.texture * 0.5 * stripes[..., None] * rng.uniform(0.5, 1.0, size=3)
    blotch = rng.normal(0, 1, size=(max(2, height // 32), max(2, width // 32)))
    blotch = cv2.resize(blotch, (width, height), interpolation=cv2.INTER_CUBIC)
    img += d.texture * 0.5 * blotch[..., None]
    return img


def _render(rng: np.random.Generator, height: int, width: int, n_objects: int,
            d: Difficulty) -> tuple[np.ndarray, list[SceneObject]] | None:
    side = min(height, width)
    shapes: list[tuple[str, str, np.ndarray]] = []
    for _ in range(n_objects):
        for _try in range(60):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            r = rng.uniform(d.min_size, d.max_size) * side
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            m = _shape_mask(shape, cx, cy, r, rng.uniform(0, 2 * math.pi), height, width)
            area = int(m.sum())
            if area < 30:
                continue
            if all((m & o).sum() <= d.max_overlap * min(area, o.sum()) for _, _, o in shapes):
                shapes.append((shape, colour, m))
                break
        else:
            return None
    # later shapes are drawn on top
    objects: list[SceneObject] = []
    covered = np.zeros((height, width), bool)
    for shape, colour, m in reversed(shapes):
        vis = m & ~covered
        if vis.sum() < MIN_VISIBLE * m.sum():
            return None
        covered |= m
        objects.append(SceneObject(shape, colour, vis))
    objects.reverse()

    img = _background(rng, height, width, d)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    for obj in objects:
        rgb = np.array(COLOURS[obj.colour], np.float64) + rng.uniform(-1, 1, 3) * d.colour_jitter
        theta = rng.uniform(0, 2 * math.pi)
        shade = 12.0 * (np.cos(theta) * xx + np.sin(theta) * yy) / side
        img[obj.visible] = rgb[None, :] + shade[obj.visible][:, None]
    img += rng.normal(0, d.noise, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


# ---- queries ---------------------------------------------------------------------------------

def _describe(colour: str | None, shape: str | None, plural: bool = False) -> str:
    noun = (shape or "shape") + ("s" if plural else "")
    return f"{colour} {noun}" if colour else noun


def _matches(obj: SceneObject, colour: str | None, shape: str | None) -> bool:
    return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)


def _descriptions(objects: list[SceneObject]) -> list[tuple[str | None, str | None]]:
    present = sorted({(o.colour, o.shape) for o in objects})
    descs: list[tuple[str | None, str | None]] = [(None, None)]
    descs += sorted({(c, None) for c, _ in present}, key=str)
    descs += sorted({(None, s) for _, s in present}, key=str)
    descs += present
    return descs


def _attribute(objects: list[SceneObject], _side: int) -> list[Query]:
    out = []
    for c, s in sorted({(o.colour, o.shape) for o in objects}):
        idx = [i for i, o in enumerate(objects) if _matches(o, c, s)]
        if len(idx) == 1:
            out.append(Query(f"the {c} {s}", (idx[0],), "attribute"))
    return out


def _comparative(objects: list[SceneObject], _side: int) -> list[Query]:
    out = []
    for c, s in _descriptions(objects):
        idx = [i for i, o in enumerate(objects) if _matches(o, c, s)]
        if len(idx) < 2:
            continue
        by_area = sorted(idx, key=lambda i: objects[i].area)
        a = [objects[i].area for i in by_area]
        if a[-1] >= AREA_RATIO * a[-2]:
            out.append(Query(f"the largest {_describe(c, s)}", (by_area[-1],), "comparative"))
        if a[1] >= AREA_RATIO * a[0]:
            out.append(Query(f"the smallest {_describe(c, s)}", (by_area[0],), "comparative"))
    return out


_EXTREMES: dict[str, Callable[[SceneObject], float]] = {
    "leftmost": lambda o: o.centroid[0],
    "rightmost": lambda o: -o.centroid[0],
    "topmost": lambda o: o.centroid[1],
    "bottommost": lambda o: -o.centroid[1],
}


def _extreme(objects: list[SceneObject], side: int) -> list[Query]:
    out = []
    for c, s in _descriptions(objects):
        idx = [i for i, o in enumerate(objects) if _matches(o, c, s)]
        if len(idx) < 2:
            continue
        for word, key in _EXTREMES.items():
            ranked = sorted(idx, key=lambda i, key=key: key(objects[i]))
            if key(objects[ranked[1]]) - key(objects[ranked[0]]) >= POSITION_MARGIN * side:
                out.append(Query(f"the {word} {_describe(c, s)}", (ranked[0],), "extreme"))
    return out


# relation word -> signed coordinate along which the target must come first
_RELATIONS: dict[str, Callable[[tuple[float, float]], float]] = {
    "left of": lambda p: p[0],
    "right of": lambda p: -p[0],
    "above": lambda p: p[1],
    "below": lambda p: -p[1],
}


def _relation(objects: list[SceneObject], side: int) -> list[Query]:
    """'the <desc> <relation> the <colour> <shape>': the reference is unique in the scene;
    exactly one candidate lies on the named side of the reference's centroid (by a margin) and
    every other candidate lies on the far side (by the same margin)."""
    out = []
    margin = POSITION_MARGIN * side
    refs = [q.targets[0] for q in _attribute(objects, side)]
    for ref in refs:
        rc = objects[ref].centroid
        for c, s in _descriptions(objects):
            idx = [i for i, o in enumerate(objects) if i != ref and _matches(o, c, s)]
            if not idx:
                continue
            for word, key in _RELATIONS.items():
                rel = [key(objects[i].centroid) - key(rc) for i in idx]
                hits = [i for i, v in zip(idx, rel, strict=True) if v <= -margin]
                clear = all(v >= margin for i, v in zip(idx, rel, strict=True) if i not in hits)
                if len(hits) == 1 and clear:
                    ref_text = _describe(objects[ref].colour, objects[ref].shape)
                    out.append(Query(f"the {_describe(c, s)} {word} the {ref_text}",
                                     (hits[0],), "relation"))
    return out


def _multi(objects: list[SceneObject], _side: int) -> list[Query]:
    out = []
    for c, s in _descriptions(objects)[1:]:  # "all shapes" is no referring expression
        idx = [i for i, o in enumerate(objects) if _matches(o, c, s)]
        if 2 <= len(idx) < len(objects):
            out.append(Query(f"all {_describe(c, s, plural=True)}", tuple(idx), "multi"))
    return out


_QUERY_MAKERS: dict[str, Callable[[list[SceneObject], int], list[Query]]] = {
    "attribute": _attribute, "comparative": _comparative, "relation": _relation,
    "extreme": _extreme, "multi": _multi,
}
_TAGS = {"attribute": ("attribute",), "comparative": ("comparative",), "relation": ("spatial",),
         "extreme": ("spatial",), "multi": ("multi",)}


def make_scene(rng: np.random.Generator, height: int, width: int, min_objects: int,
               max_objects: int, difficulty: Difficulty, max_tries: int = 500) -> Scene:
    """Draw a query kind, then scenes until one supports an unambiguous query of that kind.

    After `max_tries // 10` scenes without one (a config that rarely allows that kind, such as
    multi-target queries among two objects), any kind is accepted, the drawn one first.
    """
    first = int(rng.choice(len(QUERY_KINDS), p=QUERY_WEIGHTS))
    order = QUERY_KINDS[first:] + QUERY_KINDS[:first]
    for attempt in range(max_tries):
        n = int(rng.integers(min_objects, max_objects + 1))
        rendered = _render(rng, height, width, n, difficulty)
        if rendered is None:
            continue
        image, objects = rendered
        for kind in order if attempt >= max_tries // 10 else order[:1]:
            queries = _QUERY_MAKERS[kind](objects, min(height, width))
            if queries:
                q = queries[int(rng.integers(len(queries)))]
                return Scene(image=image, objects=tuple(objects), query=q)
    raise SampleError(f"no scene supporting an unambiguous query in {max_tries} tries "
                      f"({width}x{height}, {min_objects}-{max_objects} objects)")


def ignore_band(target: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` px of the target's boundary, on either side."""
    if width <= 0 or not target.any():
        return np.zeros_like(target, dtype=bool)
    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    t = target.astype(np.uint8)
    return cv2.dilate(t, k).astype(bool) & ~cv2.erode(t, k, borderValue=1).astype(bool)


class SyntheticDataset:
    """`num_samples` scenes from `seed`; sample k draws from a generator seeded by (seed, k)."""

    def __init__(self, num_samples: int = 24, seed: int = 0, height: int = 256, width: int = 256,
                 min_objects: int = 3, max_objects: int = 6, difficulty: str = "medium",
                 noise: float | None = None, texture: float | None = None,
                 max_overlap: float | None = None, ignore_border: int = 0,
                 name: str = "synthetic") -> None:
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, "
                             f"got {difficulty!r}")
        if not 2 <= min_objects <= max_objects:
            raise ValueError(f"need 2 <= min_objects <= max_objects, got {min_objects}, "
                             f"{max_objects}")
        if height < 32 or width < 32 or num_samples < 0:
            raise ValueError("height and width must be >= 32 and num_samples >= 0")
        d = DIFFICULTIES[difficulty]
        self.difficulty = Difficulty(
            noise=d.noise if noise is None else float(noise),
            texture=d.texture if texture is None else float(texture),
            colour_jitter=d.colour_jitter,
            max_overlap=d.max_overlap if max_overlap is None else float(max_overlap),
            min_size=d.min_size, max_size=d.max_size)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.height, self.width = int(height), int(width)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.ignore_border = int(ignore_border)
        self.name = name

    def sample_ids(self) -> list[str]:
        return [f"{k:05d}" for k in range(self.num_samples)]

    def _index(self, sample_id: str) -> int:
        try:
            k = int(sample_id)
        except ValueError:
            k = -1
        if not 0 <= k < self.num_samples or sample_id != f"{k:05d}":
            raise SampleError(f"{self.name}: no sample {sample_id!r} "
                              f"(ids are 00000..{self.num_samples - 1:05d})")
        return k

    def scene(self, sample_id: str) -> Scene:
        """The scene behind a sample, objects included (for tests and overlays)."""
        k = self._index(sample_id)
        rng = np.random.default_rng([self.seed, k])
        return make_scene(rng, self.height, self.width, self.min_objects, self.max_objects,
                          self.difficulty)

    def load(self, sample_id: str) -> Sample:
        scene = self.scene(sample_id)
        targets = set(scene.query.targets)
        target = np.zeros((self.height, self.width), bool)
        for i in targets:
            target |= scene.objects[i].visible
        gt = target.astype(np.uint8)
        gt[ignore_band(target, self.ignore_border)] = IGNORE
        return Sample(
            sample_id=sample_id, query=scene.query.text, image=scene.image, gt=gt,
            dataset=self.name,
            distractors=tuple(o.box for i, o in enumerate(scene.objects) if i not in targets),
            target_boxes=tuple(scene.objects[i].box for i in scene.query.targets),
            tags=_TAGS[scene.query.kind],
        )
