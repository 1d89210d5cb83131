"""In-process stand-ins for the planner, verifier and executor that read the ground truth.

They exist so the whole pipeline (cache, multi-N evaluation, reports) runs on a laptop with no
model: the planner finds the right object with probability `p_correct`, the verifier's score is a
noisy monotone function of the true IoU. Results made with them measure the framework, never a
model (`simulated = True`, and the pipeline marks every record).

Every output is a pure function of its inputs and a seed: hypothesis i of a sample depends on
(base_seed, image sha256, query, i) only, so asking for indices 16..31 gives exactly what indices
16..31 of a request for 0..31 gave, like a real sampler seeded with base_seed + i.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from rescue import cost, masks
from rescue.hypothesis import Hypothesis, Prompt
from rescue.models.grounding import frame_for, parse_grounding
from rescue.protocols import Segmentation, Verdict
from rescue.sample import Box, Sample

SCALE = 1000
"""Qwen3-VL grounds on a relative 0..1000 grid; the simulated raw text does too."""


PLAN_TEMPLATE_TOKENS = 40
"""Simulated text tokens of the planner's instructions around the query."""
VERIFY_TEMPLATE_TOKENS = 60
"""... and of the verifier's question (its two views: image and overlay)."""


def _rng(*parts: object) -> np.random.Generator:
    blob = "\x1f".join(str(p) for p in parts).encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(blob).digest()[:16], "little"))


def _check_prob(**probs: float) -> None:
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")


def true_iou(sample: Sample, mask: np.ndarray) -> tuple[float, int, int]:
    """(IoU, intersection, union) of `mask` with the sample's target, IGNORE pixels excluded;
    IoU is 1 when both are empty (LISA's rule)."""
    pred = np.asarray(mask, bool) & ~sample.ignore
    gt = sample.target
    inter = int((pred & gt).sum())
    union = int((pred | gt).sum())
    return (inter / union if union else 1.0), inter, union


def _phrase(query: str) -> str:
    """The planner's short noun phrase: the query without its leading article/quantifier."""
    words = query.strip().split()
    if words and words[0].lower() in {"the", "all", "a", "an", "every"}:
        words = words[1:]
    return " ".join(words) or query.strip()


def _union(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


class SimulatedPlanner:
    """Grounding hypotheses drawn around the true target(s), a distractor, or nowhere.

    Per hypothesis: with `p_invalid` a malformed output (recorded invalid); else the box of a
    target with `p_correct` (for several targets: one of them, or their union box, half and
    half), of a distractor with `p_distractor`, otherwise a random box. Each box edge moves by
    a normal jitter of `box_jitter` × the box's width or height. With `p_text` the hypothesis is
    a phrase only (no box: an executor that needs geometry reports a failure); otherwise the
    prompt carries phrase and box, and with `p_point` a positive point at the box centre.
    """

    simulated = True

    def __init__(self, p_correct: float = 0.6, p_distractor: float = 0.3,
                 box_jitter: float = 0.08, p_invalid: float = 0.05, p_text: float = 0.0,
                 p_point: float = 0.3, base_seed: int = 0) -> None:
        _check_prob(p_correct=p_correct, p_distractor=p_distractor, p_invalid=p_invalid,
                    p_text=p_text, p_point=p_point)
        if p_correct + p_distractor > 1.0:
            raise ValueError(f"p_correct + p_distractor must be <= 1, got "
                             f"{p_correct + p_distractor}")
        if box_jitter < 0:
            raise ValueError(f"box_jitter must be >= 0, got {box_jitter}")
        self.p_correct, self.p_distractor = float(p_correct), float(p_distractor)
        self.box_jitter, self.p_invalid = float(box_jitter), float(p_invalid)
        self.p_text, self.p_point = float(p_text), float(p_point)
        self.base_seed = int(base_seed)

    def identity(self) -> Mapping[str, Any]:
        return {"simulator": "SimulatedPlanner", "version": 2, "p_correct": self.p_correct,
                "p_distractor": self.p_distractor, "box_jitter": self.box_jitter,
                "p_invalid": self.p_invalid, "p_text": self.p_text, "p_point": self.p_point,
                "base_seed": self.base_seed}

    async def plan(self, sample: Sample, indices: Sequence[int]) -> list[Hypothesis]:
        """As one request with n = len(indices): the prompt is paid once, by the first child."""
        prompt = (cost.image_tokens(sample.width, sample.height)
                  + cost.text_tokens(sample.query) + PLAN_TEMPLATE_TOKENS)
        out = []
        for k, i in enumerate(indices):
            h = self.hypothesis(sample, int(i))
            c = cost.simulated_chat(prompt, cost.text_tokens(h.raw), first=k == 0)
            out.append(Hypothesis(index=h.index, prompt=h.prompt, raw=h.raw, error=h.error,
                                  label=h.label, meta=cost.with_cost(h.meta, c)))
        return out

    def hypothesis(self, sample: Sample, index: int) -> Hypothesis:
        rng = _rng("planner", self.base_seed, sample.image_sha256, sample.query, index)
        phrase = _phrase(sample.query)
        if rng.random() < self.p_invalid:
            return self._malformed(rng, index, phrase, sample.width, sample.height)

        u = rng.random()
        if u < self.p_correct and sample.target_boxes:
            source = "target"
            boxes = sample.target_boxes
            if len(boxes) > 1 and rng.random() < 0.5:
                box, source = _union(boxes), "target_union"
            else:
                box = boxes[int(rng.integers(len(boxes)))]
        elif u < self.p_correct + self.p_distractor and sample.distractors:
            source = "distractor"
            box = sample.distractors[int(rng.integers(len(sample.distractors)))]
        else:
            source = "random"
            side = min(sample.width, sample.height)
            w, h = rng.uniform(0.08, 0.5, size=2) * side
            cx, cy = rng.uniform(0, sample.width), rng.uniform(0, sample.height)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        meta = {"simulated": True, "source": source}

        if rng.random() < self.p_text:
            raw = _fence([{"label": phrase}])
            return Hypothesis(index=index, prompt=Prompt(text=phrase), raw=raw, label=phrase,
                              meta=meta)

        w, h = box[2] - box[0], box[3] - box[1]
        j = rng.normal(0.0, self.box_jitter, size=4) * np.array([w, h, w, h])
        x1, y1, x2, y2 = (np.array(box, float) + j).tolist()
        rel = [_to_rel(x1, sample.width), _to_rel(y1, sample.height),
               _to_rel(x2, sample.width), _to_rel(y2, sample.height)]
        rel = [min(rel[0], rel[2]), min(rel[1], rel[3]), max(rel[0], rel[2]), max(rel[1], rel[3])]
        item: dict[str, Any] = {"bbox_2d": rel}
        pix_box = (rel[0] * sample.width / SCALE, rel[1] * sample.height / SCALE,
                   rel[2] * sample.width / SCALE, rel[3] * sample.height / SCALE)
        points: tuple[tuple[float, float], ...] = ()
        if rng.random() < self.p_point:
            pt = [(rel[0] + rel[2]) // 2, (rel[1] + rel[3]) // 2]
            item["point_2d"] = pt
            points = ((pt[0] * sample.width / SCALE, pt[1] * sample.height / SCALE),)
        item["label"] = phrase
        prompt = Prompt(text=phrase, box=pix_box, points=points,
                        point_labels=(1,) * len(points))
        return Hypothesis(index=index, prompt=prompt, raw=_fence([item]), label=phrase,
                          meta=meta)

    @staticmethod
    def _malformed(rng: np.random.Generator, index: int, phrase: str,
                   width: int, height: int) -> Hypothesis:
        """A broken answer of the kinds real planners give, read by the real grounding parser
        so its failure reason is exactly the one a real run would record."""
        kind = int(rng.integers(4))
        box = [int(v) for v in np.sort(rng.integers(0, SCALE, size=4))]
        if kind == 0:  # cut off mid-answer (max_tokens)
            raw = _fence([{"bbox_2d": box, "label": phrase}])[: int(rng.integers(8, 24))]
        elif kind == 1:
            raw = _fence([])
        elif kind == 2:
            raw = _fence([{"bbox_2d": [box[0], "NaN", box[2]], "label": phrase}])
        else:
            raw = f"I think the {phrase} is the object near the middle of the image."
        h = parse_grounding(index, raw, frame_for(width, height))
        if h.valid:  # the parser recovered something: still the simulator's intended failure
            return Hypothesis.invalid(index, raw, "parse:bad_schema simulated malformed output",
                                      simulated=True, source="invalid")
        return Hypothesis.invalid(index, raw, h.error or "parse:unknown", simulated=True,
                                  source="invalid")


def _to_rel(v: float, size: int) -> int:
    return int(min(SCALE, max(0, round(v / size * SCALE))))


def _fence(items: list[dict[str, Any]]) -> str:
    return "```json\n" + json.dumps(items) + "\n```"


SHAPES = ("pointwise", "accept", "pairwise", "listwise")


class SimulatedVerifier:
    """Score = clip(true IoU + bias + noise · N(0, 1), 0, 1).

    Monotone in expectation (a clipped shifted normal's mean rises with its location), and the
    noise is a pure function of (seed, image, query, mask), so a mask is judged alike every time.

    `shape` is the call it answers, with the same noise model: "pointwise" that score;
    "accept" (SAM 3 Agent's accept/reject) 1 when that score is at least 1/2, else 0;
    "pairwise" (`compare`, the arena) P(first better) = 1 when the first mask's noisy score
    beats the second's, 0 when it loses, 1/2 on a tie, the noise drawn per ordered pair so the
    two orders are two independent judgements; "listwise" (`choose`, Set-of-Marks over up to
    `top_k` masks) the mask with the highest noisy score, the noise drawn per call.
    """

    simulated = True

    def __init__(self, noise: float = 0.15, bias: float = 0.0, seed: int = 0,
                 shape: str = "pointwise", top_k: int = 4) -> None:
        if noise < 0 or not math.isfinite(noise) or not math.isfinite(bias):
            raise ValueError(f"noise must be finite and >= 0, bias finite; got {noise}, {bias}")
        if shape not in SHAPES:
            raise ValueError(f"verifier.shape must be one of {SHAPES}, got {shape!r}")
        self.noise, self.bias, self.seed = float(noise), float(bias), int(seed)
        if top_k < 2:
            raise ValueError(f"verifier.top_k must be >= 2, got {top_k}")
        self.shape, self.top_k = shape, int(top_k)
        self.call_shape = shape if shape in ("pairwise", "listwise") else "pointwise"

    def identity(self) -> Mapping[str, Any]:
        ident = {"simulator": "SimulatedVerifier", "version": 1, "noise": self.noise,
                 "bias": self.bias, "seed": self.seed}
        if self.shape == "listwise":
            return {**ident, "shape": self.shape, "top_k": self.top_k}
        return ident if self.shape == "pointwise" else {**ident, "shape": self.shape}

    async def verify(self, sample: Sample, mask: np.ndarray) -> Verdict:
        return self.judge(sample, mask)

    def _noisy(self, sample: Sample, mask: np.ndarray, *call: object) -> tuple[float, float, float]:
        """(score, true IoU, eps) of one judgement; `call` names it (none: the pointwise one)."""
        iou, _, _ = true_iou(sample, mask)
        digest = masks.digest(masks.encode(mask))
        eps = _rng("verifier", self.seed, sample.image_sha256, sample.query, digest,
                   *call).normal()
        return float(np.clip(iou + self.bias + self.noise * eps, 0.0, 1.0)), iou, eps

    def judge(self, sample: Sample, mask: np.ndarray) -> Verdict:
        mask = np.asarray(mask, bool)
        if mask.shape != sample.gt.shape:
            return Verdict(score=None, source="simulated",
                           error=f"verify:bad_mask_shape {mask.shape} != image {sample.gt.shape}")
        score, iou, eps = self._noisy(sample, mask)
        if self.shape == "accept":
            score = 1.0 if score >= 0.5 else 0.0
        answer = "yes" if score >= 0.5 else "no"
        reasoning = (f"simulated verifier: true IoU {iou:.2f} + noise "
                     f"({self.noise:g} × {eps:+.2f}) + bias {self.bias:g}")
        raw = f"<think>{reasoning}</think>{answer}"
        c = cost.simulated_chat(2 * cost.image_tokens(sample.width, sample.height)
                                + cost.text_tokens(sample.query) + VERIFY_TEMPLATE_TOKENS,
                                cost.text_tokens(raw), cost.text_tokens(reasoning))
        return Verdict(score=round(score, 6), answer=answer, reasoning=reasoning, raw=raw,
                       source="simulated", meta=cost.with_cost(
                           {"simulated": True, "true_iou": round(iou, 6)}, c))

    async def compare(self, sample: Sample, first: np.ndarray, second: np.ndarray) -> Verdict:
        a, b = np.asarray(first, bool), np.asarray(second, bool)
        order = (masks.digest(masks.encode(a)), masks.digest(masks.encode(b)))
        sa, ia, _ = self._noisy(sample, a, "first", *order)
        sb, ib, _ = self._noisy(sample, b, "second", *order)
        p = 1.0 if sa > sb else 0.0 if sa < sb else 0.5
        answer = "1" if p > 0.5 else "2" if p < 0.5 else "tie"
        reasoning = (f"simulated verifier: first {ia:.2f} -> {sa:.2f}, second {ib:.2f} -> "
                     f"{sb:.2f} (true IoU -> noisy score)")
        raw = f"<think>{reasoning}</think>{answer}"
        return Verdict(score=p, answer=answer, reasoning=reasoning, raw=raw,
                       source="simulated", meta=cost.with_cost(
                           {"simulated": True}, self._cost(sample, 2, raw, reasoning)))


    async def choose(self, sample: Sample, shown: Sequence[np.ndarray]) -> Verdict:
        ms = [np.asarray(m, bool) for m in shown]
        call = tuple(masks.digest(masks.encode(m)) for m in ms)
        judged = [self._noisy(sample, m, "choose", *call) for m in ms]
        pick = int(np.argmax([s for s, _, _ in judged]))
        reasoning = "simulated verifier: " + ", ".join(
            f"{k + 1}: {iou:.2f} -> {s:.2f}" for k, (s, iou, _) in enumerate(judged))
        raw = f"<think>{reasoning}</think>{pick + 1}"
        return Verdict(score=1.0, answer=str(pick + 1), reasoning=reasoning, raw=raw,
                       source="simulated", meta=cost.with_cost(
                           {"simulated": True, "choice": pick},
                           self._cost(sample, 1, raw, reasoning)))

    @staticmethod
    def _cost(sample: Sample, images: int, raw: str, reasoning: str) -> cost.Cost:
        """A simulated call's tokens: `images` views of the image (the arena: one overlay per
        candidate; Set-of-Marks: one marked image), the query and the question, the reply."""
        return cost.simulated_chat(images * cost.image_tokens(sample.width, sample.height)
                                   + cost.text_tokens(sample.query) + VERIFY_TEMPLATE_TOKENS,
                                   cost.text_tokens(raw), cost.text_tokens(reasoning))


class SimulatedExecutor:
    """Executor for fast tests: the true target inside the prompt's box, degraded.

    When the box holds little of the target (a distractor or random box), the mask is the
    ellipse inscribed in the box instead: a plausible wrong object. Degradation grows or
    shrinks the mask by up to `noise` × its size. Score = 1 − |relative change| + noise, so it
    mildly tracks quality. Phrase-only prompts fail as the classical executor's do.
    """

    simulated = True

    def __init__(self, noise: float = 0.1, seed: int = 0) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise, self.seed = float(noise), int(seed)

    def identity(self) -> Mapping[str, Any]:
        return {"simulator": "SimulatedExecutor", "version": 1, "noise": self.noise,
                "seed": self.seed}

    async def segment(self, sample: Sample, prompts: Sequence[Prompt]) -> list[Segmentation]:
        """One call: the image encoded once (its cost on the first prompt), then each prompt;
        simulated seconds of a SAM-like server (0.1 s an encode, 0.02 s a prompt)."""
        out = []
        for k, p in enumerate(prompts):
            try:
                seg = self.segment_one(sample, p)
            except Exception as exc:  # one bad prompt never fails the others
                reason = f"execute:failed {type(exc).__name__}: {exc}"
                seg = Segmentation(rle=None, error=reason)
            c = cost.Cost(prompts=1, calls=int(k == 0), encodes=int(k == 0),
                          server_s=0.02 + (0.1 if k == 0 else 0.0), simulated=True)
            out.append(Segmentation(rle=seg.rle, score=seg.score, box=seg.box, error=seg.error,
                                    meta=cost.with_cost(seg.meta, c)))
        return out

    def segment_one(self, sample: Sample, prompt: Prompt) -> Segmentation:
        if prompt.box is None:
            return Segmentation(rle=None, error="prompt:text_only simulated executor needs a "
                                                f"box; got the phrase {prompt.text!r} alone")
        x1, y1, x2, y2 = (float(v) for v in prompt.box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return Segmentation(rle=None, error=f"box:nonfinite {prompt.box}")
        h, w = sample.gt.shape
        ix1, iy1 = int(max(0, math.floor(min(x1, x2)))), int(max(0, math.floor(min(y1, y2))))
        ix2, iy2 = int(min(w, math.ceil(max(x1, x2)))), int(min(h, math.ceil(max(y1, y2))))
        if ix2 - ix1 < 2 or iy2 - iy1 < 2:
            return Segmentation(rle=None, error=f"box:degenerate after clipping: {prompt.box}")
        rng = _rng("executor", self.seed, sample.image_sha256, prompt.key)
        inside = np.zeros((h, w), bool)
        inside[iy1:iy2, ix1:ix2] = True
        mask = sample.target & inside
        box_area = (ix2 - ix1) * (iy2 - iy1)
        if mask.sum() < 0.3 * box_area * math.pi / 4:
            e = np.zeros((h, w), np.uint8)
            cv2.ellipse(e, (((ix1 + ix2) / 2, (iy1 + iy2) / 2), (ix2 - ix1, iy2 - iy1), 0), 1, -1)
            mask = e.astype(bool)
        change = float(rng.uniform(-1, 1)) * self.noise
        r = round(abs(change) * math.sqrt(mask.sum()) / 2)
        if r > 0:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            op = cv2.dilate if change > 0 else cv2.erode
            mask = op(mask.astype(np.uint8), k).astype(bool)
        score = float(np.clip(1.0 - abs(change) + 0.1 * rng.normal(), 0.0, 1.0))
        return Segmentation(rle=masks.encode(mask), score=round(score, 6), box=masks.bbox(mask),
                            meta={"simulated": True})

