"""Text that UTF-8 cannot carry fails only what carries it, permanently (issue 14, defect 7).

A planner's JSON may spell a label "\\ud800" (Python's json decodes it to a lone surrogate);
a dataset's JSON may do the same to a query. One such string used to fail every prompt of its
image (all travel in one SAM request) as a transient error, retried on every rerun.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest
from sam_fakes import LatencyBackend
from standin import (
    PlannerScript,
    ServerThread,
    StandIn,
    Targets,
    VerifierScript,
    overlay_iou_judge,
    serve,
)

from rescue import text
from rescue.cache import Cache
from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import Hypothesis, Prompt
from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.sam_client import SamClient
from rescue.pipeline import Pipeline
from rescue.protocols import Verdict
from rescue.sample import Sample
from servers.sam_server import ServerSettings, create_app

LONE = "\ud800"
LABELS = ("cup", f"mug {LONE}", "plate", "bowl")
BOXES = ((4, 4, 20, 20), (24, 4, 40, 20), (4, 24, 20, 40), (24, 24, 40, 40))


def test_unencodable_names_the_lone_surrogate_and_replaced_is_encodable():
    assert text.unencodable("a red cup") is None
    why = text.unencodable(f"red {LONE} cup")
    assert why is not None and "\\ud800" in why and "4" in why
    assert why.isascii()
    assert text.first_unencodable({"a": ["ok", {"b": f"x{LONE}"}]}) == text.unencodable(
        f"x{LONE}")
    assert text.first_unencodable([{"text": "fine"}, 3, None]) is None
    fixed = text.replaced(f"a{LONE}b\udfffc")
    assert len(fixed) == 5 and text.unencodable(fixed) is None
    fixed.encode("utf-8")


class LabelPlanner:
    """Hypothesis i: LABELS[i] in BOXES[i]; label 1 holds a lone surrogate."""

    simulated = False

    def identity(self):
        return {"name": "label-planner"}

    async def plan(self, sample, indices):
        return [Hypothesis(index=i, prompt=Prompt(text=LABELS[i], box=BOXES[i]),
                           label=LABELS[i]) for i in indices]


class MeanVerifier:
    simulated = False

    def identity(self):
        return {"name": "mean"}

    async def verify(self, sample, mask):
        return Verdict(score=float(mask.mean()), source="parsed")


class OneImage:
    name = "one"

    def sample_ids(self):
        return ["a"]

    def load(self, sid):
        gt = np.zeros((48, 48), np.uint8)
        gt[4:20, 4:20] = 1
        return Sample(sample_id=sid, query="the cup", image=np.full((48, 48, 3), 60, np.uint8),
                      gt=gt, dataset=self.name)


@pytest.fixture(scope="module")
def sam_url():
    """A SAM server (in a thread) that claims text prompts and answers each box as its mask."""
    srv = ServerThread(create_app(LatencyBackend(latency_s=0), ServerSettings())).start()
    yield srv.url
    srv.stop()


def _run(cache_dir, url):
    client = SamClient(url, prompt_mode="text_box", retry={"attempts": 2, "base_delay_s": 0.01})
    pipe = Pipeline(LabelPlanner(), client, MeanVerifier(), Cache(cache_dir), max_n=4,
                    progress=False)

    async def go():
        try:
            return await pipe.run(OneImage(), ["a"])
        finally:
            await client.aclose()

    return asyncio.run(go()), pipe, client


def test_a_lone_surrogate_fails_only_its_prompt_permanently(tmp_path, sam_url):
    (rec,), pipe, client = _run(tmp_path / "cache", sam_url)
    by_index = {c.index: c for c in rec.candidates}
    bad = by_index[1]
    assert bad.failed_stage == "execute" and bad.error.startswith("execute:bad_text ")
    assert bad.error.isascii() and "\\ud800" in bad.error
    assert all(by_index[i].failed_stage is None for i in (0, 2, 3))
    assert by_index[0].iou == pytest.approx(1.0)
    assert client.endpoint.stats()["requests"] == 1  # the other three went through
    assert pipe.stats.failures.get("execute", 0) == 0  # an answer, not a failed request
    json.dumps(rec.to_json())  # the record is writable
    # a rerun asks nothing: the failure is cached like any answer
    (rec2,), pipe2, client2 = _run(tmp_path / "cache", sam_url)
    assert client2.endpoint.stats()["requests"] == 0
    assert pipe2.stats.requests.get("execute", 0) == 0
    assert pipe2.stats.cached["execute"] == 4
    assert rec2.to_json() == rec.to_json()


# --- the chat clients: a query UTF-8 cannot carry fails its own request -----------------------

PLAN_PROMPT = {"name": "t", "user": 'Find "{query}". JSON: [{"bbox_2d": [..], "label": ".."}]'}
VERIFY_PROMPT = {"name": "t", "user": "{views}\nRequest: {query}\nyes or no?"}
RETRY = {"attempts": 2, "base_delay_s": 0.01}


@pytest.fixture(scope="module")
def synthetic():
    ds = SyntheticDataset(num_samples=2, seed=3, height=96, width=128, difficulty="easy")
    good, other = (ds.load(i) for i in ds.sample_ids())
    return good, replace(other, query=f"the {LONE} cup")


@pytest.fixture
def chat(synthetic):
    """(stand-in, url of /v1) scripted for the synthetic samples."""
    targets = Targets(synthetic)
    si = StandIn({"planner": PlannerScript(targets, p_broken=0.0),
                  "verifier": VerifierScript(overlay_iou_judge(targets))})
    srv = serve(si)
    yield si, srv.url + "/v1"
    srv.stop()


def test_the_planner_answers_plan_bad_text_without_a_request(chat, synthetic):
    si, url = chat
    good, bad = synthetic
    planner = OpenAIPlanner("planner", url, PLAN_PROMPT, retry=RETRY)

    async def go():  # one loop, so the one client it opens is the one closed
        try:
            hyps = await planner.plan(bad, [0, 1, 2])
            asked = list(si.chat_requests())
            return hyps, asked, await planner.plan(good, [0, 1]), await planner.preflight(bad)
        finally:
            await planner.aclose()

    hyps, asked, good_hyps, preflight = asyncio.run(go())
    assert [h.index for h in hyps] == [0, 1, 2]
    assert all(not h.valid and h.error.startswith("plan:bad_text ") and h.error.isascii()
               for h in hyps)
    assert asked == []
    assert all(h.valid for h in good_hyps)
    # the preflight probes with the query repaired instead of failing the run
    assert preflight == []
    probe = si.chat_requests()[-1]
    assert probe["max_tokens"] == 1 and "\ufffd" in probe["messages"][-1]["content"][-1]["text"]


def test_the_verifier_answers_verify_bad_text_without_a_request(chat, synthetic):
    si, url = chat
    good, bad = synthetic
    verifier = OpenAIVerifier("verifier", url, VERIFY_PROMPT, retry=RETRY,
                              overlay={"views": ["overlay"]}, image={"format": "png"})

    async def go():  # one loop, so the one client it opens is the one closed
        try:
            v = await verifier.verify(bad, bad.target)
            asked = list(si.chat_requests())
            return (v, asked, await verifier.verify(good, good.target),
                    await verifier.preflight(bad))
        finally:
            await verifier.aclose()

    v, asked, good_v, preflight = asyncio.run(go())
    assert v.score is None and v.error.startswith("verify:bad_text ") and v.error.isascii()
    assert asked == []
    assert good_v.ok
    assert preflight == []


class TwoSamples:
    name = "two"

    def __init__(self, samples):
        self.samples = {s.sample_id: s for s in samples}

    def sample_ids(self):
        return sorted(self.samples)

    def load(self, sid):
        return self.samples[sid]


def test_a_bad_query_fails_its_sample_permanently_and_the_other_goes_on(tmp_path, chat,
                                                                       synthetic, sam_url):
    si, url = chat
    ds = TwoSamples(synthetic)

    def once():
        planner = OpenAIPlanner("planner", url, PLAN_PROMPT, retry=RETRY)
        verifier = OpenAIVerifier("verifier", url, VERIFY_PROMPT, retry=RETRY,
                                  overlay={"views": ["overlay"]}, image={"format": "png"})
        executor = SamClient(sam_url, prompt_mode="box", retry=RETRY)
        pipe = Pipeline(planner, executor, verifier, Cache(tmp_path / "cache"), max_n=3,
                        progress=False)

        async def go():
            try:
                return await pipe.run(ds, ds.sample_ids())
            finally:
                for m in (planner, executor, verifier):
                    await m.aclose()

        return {r.sample_id: r for r in asyncio.run(go())}, pipe

    recs, pipe = once()
    good, bad = synthetic
    assert all(c.error.startswith("plan:bad_text ") for c in recs[bad.sample_id].candidates)
    assert any(c.failed_stage is None for c in recs[good.sample_id].candidates)
    assert pipe.stats.failures.get("plan", 0) == 0  # answers, not failed requests
    asked = len(si.chat_requests())
    recs2, pipe2 = once()
    assert len(si.chat_requests()) == asked  # the rerun asks nothing
    assert pipe2.stats.model_calls == 0
    assert {k: r.to_json() for k, r in recs2.items()} == {k: r.to_json() for k, r in recs.items()}
