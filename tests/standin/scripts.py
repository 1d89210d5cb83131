"""Scripted 'models' for the stand-in: a grounding planner and a yes/no (or rating) verifier.

Each answer is a pure function of (what the request asks, the seed of its choice), so a choice
drawn with seed s is the same whether it came alone or as child k of a request with seed s - k
(vLLM V1's rule), and a clean run and a run through faults and retries give identical results.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from rescue.sample import Sample, image_digest

from .server import ChatRequest, Completion


def _rng(*parts: object) -> random.Random:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


@dataclass(frozen=True)
class Target:
    """What a sample's answer is: boxes in pixels of an image of size (width, height)."""

    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]
    distractors: tuple[tuple[float, float, float, float], ...] = ()
    label: str = "object"
    gt: np.ndarray | None = None  # (H, W) bool, for the verifier's judge


class Targets:
    """Lookup of the sample a request is about: by (pixel digest, query) when the image came
    losslessly (PNG), else by query alone (the first sample with that query)."""

    def __init__(self, samples: Iterable[Sample]):
        self.by_digest: dict[tuple[str, str], Target] = {}
        self.by_query: dict[str, Target] = {}
        self.by_digest_only: dict[str, Target] = {}
        self.images: list[tuple[np.ndarray, str, Target]] = []  # for lossy (JPEG) requests
        for s in samples:
            label = s.query.split(" that ")[0].removeprefix("the ").strip() or "object"
            t = Target(s.width, s.height, tuple(s.target_boxes), tuple(s.distractors), label,
                       s.target)
            self.by_digest[(s.image_sha256, s.query)] = t
            self.by_digest_only.setdefault(s.image_sha256, t)
            self.by_query.setdefault(s.query, t)
            self.images.append((s.image[::4, ::4].astype(np.int16), s.query, t))

    def find(self, req: ChatRequest) -> Target | None:
        for img in req.images:
            d = image_digest(img)
            for (digest, query), t in self.by_digest.items():
                if digest == d and query in req.text:
                    return t
        for img in req.images:  # a lossy copy: the closest image of that size with that query
            small = img[::4, ::4].astype(np.int16)
            near = [(float(np.abs(ref - small).mean()), t) for ref, q, t in self.images
                    if ref.shape == small.shape and q in req.text]
            if near:
                err, t = min(near, key=lambda x: x[0])
                if err < 12.0:
                    return t
        hits = [q for q in self.by_query if q in req.text]
        return self.by_query[max(hits, key=len)] if hits else None


def _rel(box: tuple[float, float, float, float], w: int, h: int) -> list[int]:
    x1, y1, x2, y2 = box
    return [round(x1 / w * 1000), round(y1 / h * 1000), round(x2 / w * 1000),
            round(y2 / h * 1000)]


class PlannerScript:
    """Answers grounding requests like Qwen3-VL-Instruct: relative 0-1000 JSON, in a few styles.

    Child k of a request with seed s is drawn from seed s + k: p_correct a jittered target box,
    p_distractor a distractor, else a random box; `p_broken` of the answers are broken in one of
    the ways real outputs are (truncated, NaN, prose only, empty list, out of image).
    """

    def __init__(self, targets: Targets, *, p_correct: float = 0.7, p_distractor: float = 0.2,
                 jitter: float = 0.06, p_broken: float = 0.0, p_point: float = 0.5):
        self.targets = targets
        self.p_correct, self.p_distractor = p_correct, p_distractor
        self.jitter, self.p_broken, self.p_point = jitter, p_broken, p_point

    def __call__(self, req: ChatRequest) -> list[Completion]:
        target = self.targets.find(req)
        base = 0 if req.seed is None else int(req.seed)
        return [self.answer(target, req.text, base + k) for k in range(req.n)]

    def answer(self, target: Target | None, text: str, seed: int) -> Completion:
        rng = _rng("plan", text, seed)
        if target is None:
            return Completion("[]")
        w, h = target.width, target.height
        u = rng.random()
        if u < self.p_correct and target.boxes:
            box = rng.choice(target.boxes)
        elif u < self.p_correct + self.p_distractor and target.distractors:
            box = rng.choice(target.distractors)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            s = rng.uniform(0.1, 0.3) * min(w, h)
            box = (cx - s, cy - s, cx + s, cy + s)
        bw, bh = box[2] - box[0], box[3] - box[1]
        j = self.jitter
        box = (box[0] + rng.gauss(0, j * bw), box[1] + rng.gauss(0, j * bh),
               box[2] + rng.gauss(0, j * bw), box[3] + rng.gauss(0, j * bh))
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
        rel = _rel(box, w, h)
        obj: dict[str, object] = {"bbox_2d": rel, "label": target.label}
        if rng.random() < self.p_point:
            obj["point_2d"] = [(rel[0] + rel[2]) // 2, (rel[1] + rel[3]) // 2]
        if rng.random() < self.p_broken:
            return self._broken(rng, obj)
        style = rng.randrange(3)
        body = json.dumps([obj])
        if style == 0:
            return Completion(f"```json\n{json.dumps([obj], indent=2)}\n```")
        if style == 1:
            return Completion(body)
        return Completion(f"The object is here: {json.dumps(obj)}")

    @staticmethod
    def _broken(rng: random.Random, obj: dict[str, object]) -> Completion:
        kind = rng.randrange(5)
        body = json.dumps([obj])
        if kind == 0:
            return Completion(body[: len(body) // 2], finish_reason="length")
        if kind == 1:
            return Completion(body.replace(str(obj["bbox_2d"][0]), "NaN", 1))  # type: ignore[index]
        if kind == 2:
            return Completion("I cannot find such an object in the image.")
        if kind == 3:
            return Completion("[]")
        return Completion(json.dumps([{**obj, "bbox_2d": [1500, 1500, 1900, 1900]}]))


def overlay_iou_judge(targets: Targets) -> Callable[[ChatRequest], float]:
    """p(yes) = IoU of the marked region with the truth.

    Needs the verifier configured with views [overlay, image] and PNG images: the marked region
    is where the overlay differs from the untouched image, and the untouched image's digest
    finds the sample.
    """

    def judge(req: ChatRequest) -> float:
        if len(req.images) < 2:
            return hash_judge(req)
        overlay, image = req.images[0], req.images[1]
        t = targets.by_digest_only.get(image_digest(image))
        if t is None or t.gt is None or overlay.shape != image.shape:
            return hash_judge(req)
        marked = np.abs(overlay.astype(int) - image.astype(int)).max(axis=2) > 12
        inter = np.logical_and(marked, t.gt).sum()
        union = np.logical_or(marked, t.gt).sum()
        return float(inter / union) if union else 1.0

    return judge


def hash_judge(req: ChatRequest) -> float:
    """A pseudo-random p(yes) fixed by the request's images and text."""
    h = hashlib.sha256(req.text.encode())
    for img in req.images:
        h.update(np.ascontiguousarray(img).tobytes())
    return int.from_bytes(h.digest()[:8], "big") / 2**64


REASONING = ("Let me look at the marked region carefully. The request asks for a specific "
             "object; I should check whether the red region covers it. Is it the right one? "
             "Maybe yes, maybe no: the outline follows an object boundary. Comparing it with "
             "the other objects in the scene, I can decide.")


class VerifierScript:
    """Answers like Qwen3-VL-Thinking: reasoning (mentioning 'yes' and 'no' on purpose), then
    "Yes"/"No" (or a 0..rating_max rating), with the answer token's distribution from `judge`."""

    def __init__(self, judge: Callable[[ChatRequest], float] = hash_judge, *,
                 thinking: bool = True, scale: str = "yes_no", rating_max: int = 10,
                 spellings: Mapping[str, float] | None = None, finish_reason: str = "stop",
                 answer_template: str = "{answer}", reasoning: str | None = None):
        self.judge = judge
        self.reasoning = REASONING if reasoning is None else reasoning
        self.thinking = thinking
        self.scale = scale
        self.rating_max = rating_max
        self.spellings = dict(spellings or {"{}": 0.85, " {}": 0.1, "{l}": 0.05})
        self.finish_reason = finish_reason
        self.answer_template = answer_template

    def distribution(self, p_yes: float) -> tuple[str, dict[str, float]]:
        """(sampled answer token, token -> probability) for p(yes) = p_yes."""
        if self.scale == "rating":
            value = round(p_yes * self.rating_max)
            dist: dict[str, float] = {}
            for v in range(min(9, self.rating_max) + 1):
                dist[str(v)] = np.exp(-((v - p_yes * self.rating_max) ** 2) / 2.0)
            z = sum(dist.values())
            dist = {k: v / z for k, v in dist.items()}
            first = str(value)[0]
            return first, dist
        dist = {}
        for word, p in (("Yes", p_yes), ("No", 1.0 - p_yes)):
            for pattern, share in self.spellings.items():
                tok = pattern.replace("{l}", word.lower()).replace("{}", word)
                dist[tok] = dist.get(tok, 0.0) + share * p
        return ("Yes" if p_yes >= 0.5 else "No"), dist

    def __call__(self, req: ChatRequest) -> list[Completion]:
        out = []
        for _ in range(req.n):
            p = min(max(self.judge(req), 1e-4), 1 - 1e-4)
            token, dist = self.distribution(p)
            if self.scale == "rating":
                value = round(p * self.rating_max)
                answer = self.answer_template.format(answer=f"{value}/{self.rating_max}")
            else:
                answer = self.answer_template.format(answer=token)
            out.append(Completion(answer, reasoning=self.reasoning if self.thinking else None,
                                  answer_token=token, answer_dist=dist,
                                  finish_reason=self.finish_reason))
        return out
