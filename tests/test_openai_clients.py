"""Planner and verifier clients end to end: the real OpenAI client against the vLLM stand-in."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from standin import (
    REASONING_PLACEMENTS,
    Completion,
    PlannerScript,
    StandIn,
    Targets,
    VerifierScript,
    overlay_iou_judge,
    serve,
    tokenize,
)

from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import contiguous_runs
from rescue.models import answers
from rescue.models.openai_planner import GROUNDING_SCHEMA, OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.views import OverlayStyle, crop_box, describe, draw_overlay, render_views
from rescue.settings import EvaluationSettings

CONF = Path(__file__).resolve().parents[1] / "conf"
PLAN_PROMPT = {"name": "t", "user": 'Find "{query}". JSON: [{"bbox_2d": [..], "label": ".."}]'}
VERIFY_PROMPT = {"name": "t", "user": "{views}\nRequest: {query}\nyes or no?"}


@pytest.fixture(scope="module")
def samples():
    ds = SyntheticDataset(num_samples=3, seed=3, height=128, width=160)
    return [ds.load(i) for i in ds.sample_ids()]


@pytest.fixture
def stand(samples):
    """A factory: stand(**StandIn kwargs) -> (StandIn, url of /v1); servers stop at teardown."""
    servers = []

    def make(**kw):
        targets = Targets(samples)
        models = kw.pop("models", None) or {
            "planner": PlannerScript(targets, p_broken=0.2),
            "verifier": VerifierScript(overlay_iou_judge(targets))}
        si = StandIn(models, **kw)
        srv = serve(si)
        servers.append(srv)
        return si, srv.url + "/v1"

    yield make
    for s in servers:
        s.stop()


def _planner(url, **kw):
    args = {"sampling": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05,
                         "presence_penalty": 1.5, "repetition_penalty": 1.05,
                         "max_tokens": 256}, "base_seed": 100,
            "retry": {"attempts": 2, "base_delay_s": 0.01}}
    args.update(kw)
    return OpenAIPlanner("planner", url, PLAN_PROMPT, **args)


def _verifier(url, **kw):
    """In-stream logprobs: what these tests read (the two-step verdict, the default, is
    test_two_step_verdict.py's)."""
    args = {"overlay": {"views": ["overlay", "image"]}, "image": {"format": "png"},
            "retry": {"attempts": 2, "base_delay_s": 0.01}, "logprobs_at": "stream"}
    args.update(kw)
    return OpenAIVerifier("verifier", url, VERIFY_PROMPT, **args)


def run(coro):
    return asyncio.run(coro)


# --- planner ---------------------------------------------------------------------------------


def test_contiguous_runs():
    assert contiguous_runs([0, 1, 2, 5, 6, 9], 16) == [(0, 3), (5, 2), (9, 1)]
    assert contiguous_runs(range(40), 16) == [(0, 16), (16, 16), (32, 8)]
    assert contiguous_runs([3, 1, 2, 2], 2) == [(1, 2), (3, 1)]
    assert contiguous_runs([], 4) == []


def test_planner_sends_n_seed_and_every_sampling_param(stand, samples):
    si, url = stand()
    planner = _planner(url, max_hypotheses_per_request=8)
    sample = samples[0]
    hyps = run(planner.plan(sample, list(range(20))))
    assert [h.index for h in hyps] == list(range(20))
    bodies = si.chat_requests("planner")
    assert sorted((b["seed"], b["n"]) for b in bodies) == [(100, 8), (108, 8), (116, 4)]
    for b in bodies:
        assert b["temperature"] == 0.7 and b["top_p"] == 0.8 and b["max_tokens"] == 256
        assert b["presence_penalty"] == 1.5
        assert b["top_k"] == 20 and b["min_p"] == 0.05 and b["repetition_penalty"] == 1.05
        user = b["messages"][-1]["content"]
        assert user[0]["type"] == "image_url"
        assert user[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert user[1] == {"type": "text", "text": PLAN_PROMPT["user"].replace(
            "{query}", sample.query)}
        assert "response_format" not in b
    for h in hyps:  # choice k of the request with seed s is index s - base_seed + k
        assert h.meta["seed"] == 100 + h.index
    assert any(h.valid for h in hyps) and any(not h.valid for h in hyps)  # p_broken = 0.2


def test_planner_index_mapping_does_not_depend_on_grouping(stand, samples):
    _, url = stand()
    sample = samples[1]
    together = run(_planner(url, max_hypotheses_per_request=64).plan(sample, range(12)))
    apart = run(_planner(url, max_hypotheses_per_request=5).plan(sample, range(12)))
    later = run(_planner(url).plan(sample, [7, 8, 9, 10, 11]))
    assert [_answer(h) for h in together] == [_answer(h) for h in apart]
    assert [_answer(h) for h in later] == [_answer(h) for h in together[7:]]


def _answer(h):
    """A hypothesis without its cost (which depends on how indices were grouped)."""
    d = h.to_json()
    d["meta"] = {k: v for k, v in d["meta"].items() if k != "cost"}
    return d


def test_planner_returns_exactly_the_asked_indices_in_order(stand, samples):
    si, url = stand()
    hyps = run(_planner(url).plan(samples[0], [9, 3, 4, 5, 0]))
    assert [h.index for h in hyps] == [9, 3, 4, 5, 0]
    assert sorted((b["seed"], b["n"]) for b in si.chat_requests()) == [(100, 1), (103, 3),
                                                                        (109, 1)]


def test_planner_structured_output_sends_a_json_schema(stand, samples):
    si, url = stand()
    planner = _planner(url, structured_output=True)
    run(planner.plan(samples[0], [0, 1]))
    (body,) = si.chat_requests()
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "grounding", "schema": GROUNDING_SCHEMA}}
    assert planner.identity()["structured_output"] == GROUNDING_SCHEMA


def test_planner_identity_is_url_free_and_covers_what_changes_answers():
    a = _planner("http://host-a:8002/v1")
    b = _planner("http://host-b:9999/v1", max_concurrency=3, max_hypotheses_per_request=4)
    assert a.identity() == b.identity()
    ident = a.identity()
    assert ident["model"] == "planner" and ident["prompt"]["user"] == PLAN_PROMPT["user"]
    assert ident["sampling"]["top_k"] == 20 and ident["coords"] == "relative_1000"
    assert "http" not in str(ident)
    c = OpenAIPlanner("planner", "http://x/v1", {"user": PLAN_PROMPT["user"] + " "},
                      sampling=dict(_planner("http://x").sampling.to_json()), base_seed=100)
    assert c.identity() != ident  # template text is part of it
    assert _planner("http://x/v1", coords="absolute").identity() != ident


def test_planner_maps_relative_boxes_to_pixels(stand, samples):
    def answer(req):
        return [Completion('[{"bbox_2d": [0, 500, 500, 1000], "label": "Lower Left"}]')
                for _ in range(req.n)]

    _, url = stand(models={"planner": answer})
    sample = samples[0]
    (h,) = run(_planner(url, image={"max_side": 64}).plan(sample, [0]))
    assert h.label == "Lower Left"
    assert h.prompt.box == (0.0, sample.height / 2, sample.width / 2, float(sample.height))


def test_prompt_template_must_have_the_query_placeholder():
    with pytest.raises(ValueError, match="query"):
        OpenAIPlanner("m", "http://x/v1", {"user": "find the thing"})


# --- verifier --------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", REASONING_PLACEMENTS)
def test_verifier_scores_from_logprobs_after_the_reasoning(stand, samples, placement):
    judge_p = 0.8

    def fixed(_req):
        return judge_p

    si, url = stand(models={"verifier": VerifierScript(fixed)}, reasoning_placement=placement)
    verifier = _verifier(url)
    sample = samples[0]
    v = run(verifier.verify(sample, sample.target))
    assert v.ok and v.source == "logprobs"
    assert v.score == pytest.approx(judge_p, abs=1e-6)
    assert v.answer == "Yes"
    assert v.reasoning.startswith("Let me look") and "</think>" not in v.reasoning
    (body,) = si.chat_requests()
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["n"] == 1
    for key in ("temperature", "top_p", "max_tokens", "presence_penalty", "seed", "top_k",
                "min_p", "repetition_penalty"):
        assert key in body
    images = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
    assert len(images) == 2 and images[0]["image_url"]["url"].startswith("data:image/png")


def test_an_opaque_images_model_sees_url_digests_and_decodes_nothing(stand, samples):
    """The benchmarks' verifier mode: each image stands for its URL's SHA-256, two views stay
    two images, and the stand-in's decoder is never used."""
    import hashlib

    seen = []

    def judge(req):
        seen.append(req.images)
        return 0.8

    si, url = stand(models={"verifier": VerifierScript(judge)},
                    opaque_images=frozenset({"verifier"}))
    sample = samples[0]
    v = run(_verifier(url).verify(sample, sample.target))
    assert v.ok and v.score == pytest.approx(0.8, abs=1e-6)
    (body,) = si.chat_requests()
    urls = [p["image_url"]["url"] for p in body["messages"][-1]["content"]
            if p["type"] == "image_url"]
    assert len(urls) == 2 and len(seen) == 1
    assert [bytes(img) for img in seen[0]] == [hashlib.sha256(u.encode()).digest() for u in urls]
    assert not si._images._memo  # nothing decoded


def test_verifier_ignores_yes_and_no_inside_the_reasoning(stand, samples):
    # the stand-in's reasoning says "Maybe yes, maybe no"; the answer token comes after it
    _, url = stand(models={"verifier": VerifierScript(lambda r: 0.1)},
                   reasoning_placement="content")
    v = run(_verifier(url).verify(samples[0], samples[0].target))
    assert v.score == pytest.approx(0.1, abs=1e-6) and v.answer == "No"
    assert v.meta["answer_token"] == len(tokenize(v.raw)) - 1


def test_verifier_sums_spellings_and_bounds_a_missing_side(stand, samples):
    script = VerifierScript(lambda r: 0.999999, spellings={"{}": 0.7, " {}": 0.2, "{l}": 0.1})
    _, url = stand(models={"verifier": script})
    v = run(_verifier(url, top_logprobs=3).verify(samples[0], samples[0].target))
    # top-3 are Yes, " Yes", "yes": no "No" listed -> bounded by the smallest listed probability
    assert v.source == "logprobs" and v.meta.get("bounded") is True
    assert 0.5 < v.score < 1.0
    assert v.meta["p_yes"] == pytest.approx(0.9999, abs=1e-3)


def test_verifier_rating_variant(stand, samples):
    _, url = stand(models={"verifier": VerifierScript(lambda r: 0.7, scale="rating")})
    v = run(_verifier(url, scale="rating").verify(samples[0], samples[0].target))
    assert v.source == "logprobs" and v.answer == "7/10"
    assert v.score == pytest.approx(0.7, abs=0.02)
    # without logprobs the text is parsed
    p = run(_verifier(url, scale="rating", logprobs=False).verify(samples[0], samples[0].target))
    assert p.source == "parsed" and p.score == pytest.approx(0.7)


def test_verifier_falls_back_to_the_parsed_answer(stand, samples):
    si, url = stand(models={"verifier": VerifierScript(lambda r: 0.3)})
    v = run(_verifier(url, logprobs=False).verify(samples[0], samples[0].target))
    assert v.source == "parsed" and v.score == 0.0 and v.answer == "No"
    (body,) = si.chat_requests()
    assert "logprobs" not in body or not body["logprobs"]


def test_verifier_unparseable_and_unfinished_answers_are_recorded(stand, samples):
    def rambling(req):
        return [Completion("It is hard to say.", reasoning="hmm") for _ in range(req.n)]

    def cut(req):
        return [Completion("", reasoning="I keep thinking", finish_reason="length")
                for _ in range(req.n)]

    _, url = stand(models={"verifier": rambling})
    v = run(_verifier(url).verify(samples[0], samples[0].target))
    assert v.score is None and v.error.startswith("verify:unparseable")
    assert v.reasoning == "hmm"
    _, url2 = stand(models={"verifier": cut}, reasoning_placement="content_open")
    v2 = run(_verifier(url2).verify(samples[0], samples[0].target))
    assert v2.score is None and v2.error.startswith("verify:truncated")
    assert v2.meta["truncated"] and v2.reasoning.startswith("I keep thinking")


def test_verifier_empty_mask_rule_makes_no_call(stand, samples):
    si, url = stand()
    empty = np.zeros(samples[0].gt.shape, dtype=bool)
    v = run(_verifier(url).verify(samples[0], empty))
    assert v.score == 0.0 and v.source == "rule" and si.chat_requests() == []
    v2 = run(_verifier(url, empty_mask_score=None).verify(samples[0], empty))
    assert v2.source == "logprobs" and len(si.chat_requests()) == 1


def test_verifier_identity_and_validation():
    a = _verifier("http://a/v1")
    assert a.identity() == _verifier("http://b/v1", max_concurrency=2).identity()
    assert a.identity() != _verifier("http://a/v1", overlay={"views": ["overlay"]}).identity()
    assert a.identity() != _verifier("http://a/v1", top_logprobs=5).identity()
    with pytest.raises(ValueError, match="top_logprobs"):
        _verifier("http://a/v1", top_logprobs=50)
    with pytest.raises(ValueError, match="scale"):
        _verifier("http://a/v1", scale="stars")


def test_judged_scores_rank_good_masks_above_bad_ones(stand, samples):
    _, url = stand()
    verifier = _verifier(url)
    sample = samples[2]
    shifted = np.roll(sample.target, sample.width // 3, axis=1)
    async def both():
        return await asyncio.gather(verifier.verify(sample, sample.target),
                                    verifier.verify(sample, shifted))

    good, bad = run(both())
    assert good.score > 0.5 > bad.score


# --- answers (pure) --------------------------------------------------------------------------


def test_split_reasoning_three_placements():
    assert answers.split_reasoning("\n\nYes", reasoning="r").placement == "reasoning"
    rc = answers.split_reasoning("Yes", reasoning_content="r")
    assert (rc.reasoning, rc.answer, rc.placement) == ("r", "Yes", "reasoning_content")
    t = answers.split_reasoning("a </think> b </think>\n\nNo")
    assert (t.reasoning, t.answer, t.placement) == ("a </think> b", "No", "think_tag")
    u = answers.split_reasoning("<think>still going")
    assert (u.answer, u.placement) == ("", "unfinished")
    assert answers.split_reasoning("Yes.").placement == "none"


def test_yes_no_score_matches_brute_force():
    rng = np.random.default_rng(0)
    words = ["Yes", " yes", "YES", "No", " no", "**No", "Maybe", " the"]
    for _ in range(200):
        logits = rng.normal(size=len(words))
        logp = logits - np.log(np.exp(logits).sum())
        tok = answers.TokenLogprob(words[0], float(logp[0]),
                                   tuple(zip(words, map(float, logp), strict=True)))
        yn = answers.yes_no_score(tok)
        p = np.exp(logp)
        want = p[:3].sum() / (p[:3].sum() + p[3:6].sum())
        assert yn.score == pytest.approx(want) and not yn.bounded


def test_parsers():
    assert answers.parse_yes_no("**Yes**, it is.") == 1.0
    assert answers.parse_yes_no("No.") == 0.0
    assert answers.parse_yes_no("Not sure") is None
    assert answers.parse_rating("7/10", 10) == 0.7
    assert answers.parse_rating("Rating: 3 out of 5", 10) == 0.6
    assert answers.parse_rating("8", 10) == 0.8
    assert answers.parse_rating("12", 10) is None
    assert answers.parse_rating("none", 10) is None


def test_rating_ten_written_as_two_digits():
    toks = [answers.TokenLogprob("1", math.log(0.9), (("1", math.log(0.9)),
                                                      ("9", math.log(0.1)))),
            answers.TokenLogprob("0", 0.0)]
    assert answers.rating_score(toks, 0, 10) == pytest.approx((0.9 * 10 + 0.1 * 9) / 10)


# --- overlay ---------------------------------------------------------------------------------


def test_overlay_tints_inside_and_outlines_the_boundary():
    img = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[20:40, 30:50] = True
    style = OverlayStyle.from_config({"alpha": 0.5, "outline_px": 1})
    out = draw_overlay(img, mask, style)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert tuple(out[30, 40]) == (178, 50, 50)  # tinted halfway to red
    assert tuple(out[20, 35]) == (255, 0, 0)  # outline
    assert tuple(out[5, 5]) == (100, 100, 100)  # untouched
    assert (img == 100).all()  # input not modified


def test_views_and_crop_zoom():
    img = np.zeros((200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[90:100, 140:160] = True
    style = OverlayStyle.from_config({"views": ["overlay", "crop", "image"], "crop_size": 256})
    views = render_views(img, mask, style)
    assert [n for n, _ in views] == ["overlay", "crop", "image"]
    x1, y1, x2, y2 = crop_box(mask, style)
    assert x1 <= 140 and x2 >= 160 and y1 <= 90 and y2 >= 100
    assert max(views[1][1].shape[:2]) == 256  # zoomed in
    empty = render_views(img, np.zeros_like(mask), style)
    assert len(empty) == 3 and empty[1][1].shape == img.shape  # no crop: the full overlay
    assert "Image 2 shows a zoomed-in view" in describe(style.views)
    with pytest.raises(ValueError, match="views"):
        OverlayStyle.from_config({"views": ["heatmap"]})


# --- configs ---------------------------------------------------------------------------------


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # outside a Hydra run no runtime cwd exists to resolve paths.* against
        return compose(config_name="config",
                       overrides=[f"paths.root_dir={CONF.parent}", *overrides])


@pytest.mark.parametrize(("group", "option"), [
    ("planner", "qwen3vl_8b_instruct"), ("planner", "qwen3vl_8b_thinking"),
    ("verifier", "qwen3vl_32b_thinking"),
    ("verifier", "qwen3vl_8b_instruct"), ("verifier", "qwen3vl_32b_thinking_rating"),
    ("executor", "sam3")])
def test_configs_instantiate_with_env_overrides(group, option, monkeypatch):
    monkeypatch.setenv("PLANNER_API_BASE", "http://planner.example:1/v1")
    monkeypatch.setenv("VERIFIER_API_BASE", "http://verifier.example:2/v1")
    monkeypatch.setenv("EXECUTOR_API_BASE", "http://127.0.0.1:1")
    cfg = _compose(["experiment=http_synthetic", f"{group}={option}", "seed=5"])
    node = OmegaConf.to_container(cfg[group], resolve=True)
    model = instantiate(cfg[group])
    env = {"planner": "http://planner.example:1/v1", "verifier": "http://verifier.example:2/v1",
           "executor": "http://127.0.0.1:1"}[group]
    assert model.base_url == env
    if group == "executor":
        assert model.identity()["server"] == {"unresolved": True}  # nothing listens there
        return
    ident = model.identity()
    assert ident["prompt"]["user"] == node["prompt"]["user"] and "{query}" in node["prompt"]["user"]
    assert "http" not in str(ident)


def test_config_values_follow_the_model_cards():
    cfg = _compose(["experiment=http_synthetic", "seed=3"])
    p = instantiate(cfg.planner)
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k,
            p.sampling.presence_penalty) == (0.7, 0.8, 20, 1.5)
    assert p.base_seed == 3 and p.coords == "relative_1000"
    v = instantiate(cfg.verifier)
    assert (v.sampling.temperature, v.sampling.top_p, v.sampling.top_k,
            v.sampling.presence_penalty) == (0.6, 0.95, 20, 0.0)
    assert v.top_logprobs == 20 and v.sampling.max_tokens >= 4096 and v.scale == "yes_no"
    r = instantiate(_compose(["experiment=http_synthetic",
                              "verifier=qwen3vl_32b_thinking_rating"]).verifier)
    assert r.scale == "rating" and "{max}" in r.template.user
    e = _compose(["experiment=reasonseg_multi_n"])
    assert e.max_n == 64 and EvaluationSettings.from_config(e).n_grid == (1, 2, 4, 8, 16, 32, 64)
    assert e.subset.fraction == 0.1 and e.planner._target_.endswith("OpenAIPlanner")


# --- cost: the `usage` the server sent is what the answers record ----------------------------


def test_planner_records_the_usage_it_was_sent_prompt_once_per_request(stand, samples):
    si, url = stand()
    hyps = run(_planner(url, max_hypotheses_per_request=5).plan(samples[0], range(12)))
    usages = [u for u in si.usages if u["model"] == "planner"]
    assert len(usages) == 3  # 5 + 5 + 2
    costs = [h.meta["cost"] for h in hyps]
    carriers = [h.index for h, c in zip(hyps, costs, strict=True) if c.get("prompt_tokens")]
    assert carriers == [0, 5, 10]  # each request's prompt paid once, by its first child
    assert sum(c.get("prompt_tokens", 0) for c in costs) == sum(u["prompt_tokens"]
                                                                for u in usages)
    assert sum(c.get("completion_tokens", 0) for c in costs) == sum(u["completion_tokens"]
                                                                    for u in usages)
    assert sum(c.get("calls", 0) for c in costs) == 3
    assert all(c["latency_s"] > 0 for c in costs if c.get("calls"))


def test_planner_children_share_the_completion_total_when_not_counted_apart(stand, samples):
    si, url = stand()
    hyps = run(_planner(url).plan(samples[0], range(4)))
    assert sum(h.meta["cost"].get("completion_tokens", 0) for h in hyps) == \
        si.usages[-1]["completion_tokens"]
    # vLLM's usage sums the children; without logprobs each child's share is apportioned by
    # the length of its text, and says so
    assert all(h.meta["cost"].get("estimated") is True for h in hyps)


def test_verifier_records_the_usage_it_was_sent_reasoning_included(stand, samples):
    si, url = stand()
    sample = samples[0]
    verdicts = [run(_verifier(url).verify(sample, m)) for m in (sample.target, ~sample.target)]
    usages = [u for u in si.usages if u["model"] == "verifier"]
    assert len(usages) == 2
    for v, u in zip(verdicts, usages, strict=True):
        c = v.meta["cost"]
        assert c["prompt_tokens"] == u["prompt_tokens"] > 0
        assert c["completion_tokens"] == u["completion_tokens"] > 0
        assert c.get("reasoning_tokens", 0) == (
            (u["completion_tokens_details"] or {}).get("reasoning_tokens") or 0)
        assert c["calls"] == 1 and c["latency_s"] > 0
