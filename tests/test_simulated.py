"""Simulated planner, verifier and executor: seeded, index-stable, and their noise as configured."""

import asyncio
import itertools
import json
import math

import numpy as np
import pytest

from rescue import masks
from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import Prompt
from rescue.models.simulated import (
    SimulatedExecutor,
    SimulatedPlanner,
    SimulatedVerifier,
    true_iou,
)
from rescue.protocols import Executor, Planner, Verifier
from rescue.sample import IGNORE, Sample


@pytest.fixture(scope="module")
def samples():
    ds = SyntheticDataset(num_samples=24, seed=4)
    return [ds.load(i) for i in ds.sample_ids()]


def _plan(planner, sample, indices):
    return asyncio.run(planner.plan(sample, list(indices)))


def _unfence(raw: str):
    body = raw.strip().removeprefix("```json").removesuffix("```")
    return json.loads(body)


def _box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def test_protocols_and_identity():
    p, v, e = SimulatedPlanner(base_seed=3), SimulatedVerifier(seed=5), SimulatedExecutor()
    assert isinstance(p, Planner) and isinstance(v, Verifier) and isinstance(e, Executor)
    assert p.simulated and v.simulated and e.simulated
    assert p.identity()["simulator"] == "SimulatedPlanner" and p.identity()["base_seed"] == 3
    assert p.identity()["p_correct"] == 0.6 and "p_invalid" in p.identity()
    assert v.identity() == {"simulator": "SimulatedVerifier", "version": 1, "noise": 0.15,
                            "bias": 0.0, "seed": 5}
    assert SimulatedPlanner(p_correct=0.5).identity() != SimulatedPlanner().identity()


def _answer(h):
    d = h.to_json()
    d["meta"] = {k: v for k, v in d["meta"].items() if k != "cost"}
    return d


def test_simulated_costs_are_plausible_marked_and_pay_the_prompt_once(samples):
    s = samples[0]
    hyps = _plan(SimulatedPlanner(), s, range(6))
    costs = [h.meta["cost"] for h in hyps]
    assert all(c["simulated"] and c["completion_tokens"] > 0 for c in costs)
    assert [bool(c.get("prompt_tokens")) for c in costs] == [True] + [False] * 5
    assert costs[0]["prompt_tokens"] > (s.width // 32) * (s.height // 32)  # the image's tokens
    v = asyncio.run(SimulatedVerifier().verify(s, s.target))
    assert v.meta["cost"]["simulated"] and v.meta["cost"]["calls"] == 1
    assert 0 < v.meta["cost"]["reasoning_tokens"] < v.meta["cost"]["completion_tokens"]
    segs = asyncio.run(SimulatedExecutor().segment(s, [h.prompt for h in hyps if h.valid]))
    assert [g.meta["cost"].get("encodes", 0) for g in segs] == [1] + [0] * (len(segs) - 1)


def test_planner_index_stability(samples):
    planner = SimulatedPlanner(base_seed=7)
    for s in samples[:6]:
        full = _plan(planner, s, range(32))
        tail = _plan(planner, s, range(16, 32))
        scattered = _plan(planner, s, [31, 3, 17])
        assert [h.index for h in full] == list(range(32))
        # the answers do not depend on the grouping; the cost does (one request's prompt)
        assert [_answer(h) for h in full[16:]] == [_answer(h) for h in tail]
        assert [_answer(h) for h in scattered] == [_answer(full[i]) for i in (31, 3, 17)]
        # another instance, same seed: same answers; another seed: different ones
        assert _plan(SimulatedPlanner(base_seed=7), s, range(8)) == full[:8]
        other = _plan(SimulatedPlanner(base_seed=8), s, range(32))
        assert [h.to_json() for h in other] != [h.to_json() for h in full]


def test_raw_text_is_qwen_grounding_json_matching_the_prompt(samples):
    planner = SimulatedPlanner(p_invalid=0.0, p_point=0.5)
    seen_point = False
    for s in samples[:8]:
        for h in _plan(planner, s, range(16)):
            assert h.valid and h.label
            item, = _unfence(h.raw)
            rel = item["bbox_2d"]
            assert len(rel) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in rel)
            assert rel[0] <= rel[2] and rel[1] <= rel[3]
            want = (rel[0] * s.width / 1000, rel[1] * s.height / 1000,
                    rel[2] * s.width / 1000, rel[3] * s.height / 1000)
            assert h.prompt.box == pytest.approx(want)
            assert h.prompt.text == item["label"] == h.label
            if "point_2d" in item:
                seen_point = True
                px, py = item["point_2d"]
                assert h.prompt.points == ((px * s.width / 1000, py * s.height / 1000),)
                assert h.prompt.point_labels == (1,)
            else:
                assert h.prompt.points == ()
    assert seen_point


def test_invalid_rate_is_close_to_p_invalid(samples):
    planner = SimulatedPlanner(p_invalid=0.1)
    hyps = [h for s in samples for h in _plan(planner, s, range(100))]
    invalid = [h for h in hyps if not h.valid]
    rate = len(invalid) / len(hyps)
    # 2400 draws: the binomial standard deviation is 0.006; 0.03 is five of them
    assert abs(rate - 0.1) < 0.03
    for h in invalid:
        assert h.prompt is None and h.error and h.meta["simulated"]
        try:
            parsed = _unfence(h.raw)
        except json.JSONDecodeError:
            continue  # truncated or prose: malformed indeed
        bad_box = parsed and any(not all(isinstance(v, int) for v in it["bbox_2d"])
                                 or len(it["bbox_2d"]) != 4 for it in parsed)
        assert parsed == [] or bad_box, h.raw


def test_sources_follow_the_probabilities(samples):
    planner = SimulatedPlanner(p_correct=0.5, p_distractor=0.3, p_invalid=0.0, box_jitter=0.0)
    counts = {"target": 0, "target_union": 0, "distractor": 0, "random": 0}
    for s in samples:
        for h in _plan(planner, s, range(100)):
            src = h.meta["source"]
            counts[src] += 1
            if src == "target":  # no jitter: the box is a target box, up to the 0..1000 grid
                assert max(_box_iou(h.prompt.box, b) for b in s.target_boxes) > 0.9
            elif src == "distractor":
                assert max(_box_iou(h.prompt.box, b) for b in s.distractors) > 0.9
            elif src == "target_union":
                assert len(s.target_boxes) > 1
    n = sum(counts.values())
    assert abs((counts["target"] + counts["target_union"]) / n - 0.5) < 0.05
    assert abs(counts["distractor"] / n - 0.3) < 0.05
    assert counts["target_union"] > 0


def test_jitter_moves_boxes_in_proportion(samples):
    s = next(s for s in samples if len(s.target_boxes) == 1)
    planner = SimulatedPlanner(p_correct=1.0, p_distractor=0.0, p_invalid=0.0, box_jitter=0.1)
    hyps = _plan(planner, s, range(200))
    assert all(h.meta["source"] == "target" for h in hyps)
    tb = s.target_boxes[0]
    w = tb[2] - tb[0]
    dx = np.array([h.prompt.box[0] - tb[0] for h in hyps])
    assert 0.05 * w < dx.std() < 0.2 * w  # std 0.1·w, with quantisation and clipping


def test_text_only_and_no_point_settings(samples):
    s = samples[1]
    text = _plan(SimulatedPlanner(p_text=1.0, p_invalid=0.0), s, range(10))
    assert all(h.prompt.box is None and h.prompt.text for h in text)
    nopt = _plan(SimulatedPlanner(p_point=0.0, p_invalid=0.0), s, range(10))
    assert all(h.prompt.points == () for h in nopt)


def test_planner_refuses_bad_probabilities():
    with pytest.raises(ValueError):
        SimulatedPlanner(p_correct=0.8, p_distractor=0.3)
    with pytest.raises(ValueError):
        SimulatedPlanner(p_invalid=1.5)


def _square_sample(size=64, ignore=False):
    gt = np.zeros((size, size), np.uint8)
    gt[16:48, 16:48] = 1
    if ignore:
        gt[14:16, 16:48] = IGNORE
    img = np.zeros((size, size, 3), np.uint8)
    return Sample(sample_id="sq", query="the square", image=img, gt=gt)


def test_true_iou_respects_ignore_and_empty():
    s = _square_sample(ignore=True)
    bigger = np.zeros((64, 64), bool)
    bigger[14:48, 16:48] = True  # target plus the ignore band
    assert true_iou(s, bigger)[0] == 1.0
    half = np.zeros((64, 64), bool)
    half[16:48, 16:32] = True
    assert true_iou(s, half) == (0.5, 512, 1024)
    empty = Sample(sample_id="e", query="nothing", image=np.zeros((8, 8, 3), np.uint8),
                   gt=np.zeros((8, 8), np.uint8))
    assert true_iou(empty, np.zeros((8, 8), bool))[0] == 1.0


def test_verifier_is_deterministic_and_noiseless_when_asked():
    s = _square_sample()
    half = np.zeros((64, 64), bool)
    half[16:48, 16:32] = True
    v = SimulatedVerifier(seed=1)
    a, b = asyncio.run(v.verify(s, half)), asyncio.run(SimulatedVerifier(seed=1).verify(s, half))
    assert a == b and a.ok and a.source == "simulated"
    assert "true IoU 0.50" in a.reasoning and a.meta["true_iou"] == 0.5
    assert a.answer == ("yes" if a.score >= 0.5 else "no")
    assert asyncio.run(SimulatedVerifier(seed=2).verify(s, half)).score != a.score
    exact = asyncio.run(SimulatedVerifier(noise=0.0, bias=0.1).verify(s, half))
    assert exact.score == pytest.approx(0.6)
    assert asyncio.run(SimulatedVerifier(noise=0.0, bias=0.7).verify(s, half)).score == 1.0
    wrong = asyncio.run(v.verify(s, np.zeros((10, 10), bool)))
    assert not wrong.ok and "shape" in wrong.error


def test_verifier_is_monotone_in_expectation(samples):
    """Masks at four IoU levels (the target shifted by 0, 4, 8, 12 px), six distinct masks per
    level and sample (a stray pixel in a corner makes each digest, hence its noise, differ):
    the mean score must rise with the true IoU."""
    v = SimulatedVerifier(noise=0.15)
    ious, means, spread = [], [], []
    for shift in (0, 4, 8, 12):
        pairs = []
        for s in samples:
            m = np.roll(s.target, shift, axis=1)
            for j in range(6):
                mj = m.copy()
                mj[0, j] = True
                pairs.append((true_iou(s, mj)[0], asyncio.run(v.verify(s, mj)).score))
        ious.append(np.mean([i for i, _ in pairs]))
        means.append(np.mean([sc for _, sc in pairs]))
        spread.append(np.std([sc - i for i, sc in pairs]))
    assert all(a > b for a, b in itertools.pairwise(ious))
    assert all(a > b for a, b in itertools.pairwise(means)), (ious, means)
    assert all(0.05 < sd < 0.2 for sd in spread[1:])  # the noise is there, at about 0.15


def test_simulated_executor(samples):
    s = samples[2]
    ex = SimulatedExecutor(noise=0.0)
    good, text, out = asyncio.run(ex.segment(s, [
        Prompt(box=s.target_boxes[0]), Prompt(text="a thing"), Prompt(box=(-5, -5, -1, -1))]))
    assert good.ok and true_iou(s, masks.decode(good.rle))[0] > 0.5
    assert not text.ok and "prompt:text_only" in text.error
    assert not out.ok and "degenerate" in out.error
    if s.distractors:
        (d,) = asyncio.run(ex.segment(s, [Prompt(box=s.distractors[0])]))
        assert d.ok and true_iou(s, masks.decode(d.rle))[0] < 0.5
    noisy = SimulatedExecutor(noise=0.3)
    first = asyncio.run(noisy.segment(s, [Prompt(box=s.target_boxes[0])]))[0]
    assert first == asyncio.run(noisy.segment(s, [Prompt(box=s.target_boxes[0])]))[0]
    assert 0.0 <= first.score <= 1.0 and not math.isnan(first.score)
