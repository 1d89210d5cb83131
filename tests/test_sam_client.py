"""The SAM client against the project's real SAM server (classical backend) over HTTP."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from faultproxy import FaultPlan, FaultProxy
from standin import ServerThread, free_port

from rescue import masks
from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import Prompt
from rescue.metrics import iou, iou_counts
from rescue.models.http import EndpointError, UndecodableReply
from rescue.models.roles import Models, PreflightError
from rescue.models.sam_client import (
    DEFAULT_PROMPT_MODE,
    PROMPT_MODES,
    RecordedInfo,
    SamClient,
    choose_instances,
    mode_parts,
    mode_unsupported,
    reduce_prompt,
    segment_answer,
)
from servers.backends import make_backend
from servers.sam_server import ServerSettings, create_app


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def samples():
    ds = SyntheticDataset(num_samples=4, seed=11, height=120, width=160, difficulty="easy")
    return [ds.load(i) for i in ds.sample_ids()]


@pytest.fixture
def sam():
    """A factory: sam(**ServerSettings) -> base URL of a classical SAM server in a thread."""
    servers = []

    def make(**settings):
        app = create_app(make_backend("classical", {}), ServerSettings(**settings))
        srv = ServerThread(app).start()
        servers.append(srv)
        return srv.url

    yield make
    for s in servers:
        s.stop()


def _client(url, **kw):
    kw.setdefault("retry", {"attempts": 3, "base_delay_s": 0.01})
    return SamClient(url, **kw)


def _record_images(client):
    """Wrap the client's POST to record how each request sent its image."""
    sent = []
    post = client._post

    async def recording(payload):
        sent.append(next(iter(payload["image"])))
        return await post(payload)

    client._post = recording
    return sent


def test_segments_every_prompt_in_one_request(sam, samples):
    url = sam()
    client = _client(url, instance_policy="top1", prompt_mode="box_points")
    s = samples[0]
    box = s.target_boxes[0]
    prompts = [Prompt(box=box), Prompt(text="the thing", box=box),
               Prompt(text="only text"), Prompt(box=box),  # duplicate of the first
               Prompt(points=(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),),
                      point_labels=(1,))]
    sent = _record_images(client)
    segs = run(client.segment(s, prompts))
    assert len(segs) == 5 and sent == ["b64"]
    assert client.stats()["requests"] == 1
    for k in (0, 1, 3):
        assert segs[k].ok and segs[k].rle["size"] == [s.height, s.width]
        assert iou(*iou_counts(masks.decode(segs[k].rle), s.gt)) > 0.5
        assert 0.0 <= segs[k].score <= 1.0 and segs[k].box is not None
    assert segs[0].rle == segs[3].rle
    assert not segs[2].ok and segs[2].error.startswith("execute:empty_prompt")  # box modes
    assert "prompt_mode=box_points" in segs[2].error
    assert segs[4].ok


def test_second_call_sends_the_digest_and_resends_bytes_when_evicted(sam, samples):
    url = sam(image_cache_size=1)
    client = _client(url)
    sent = _record_images(client)
    a, b = samples[0], samples[1]

    async def go():
        first = await client.segment(a, [Prompt(box=a.target_boxes[0])])
        again = await client.segment(a, [Prompt(box=a.target_boxes[0])])
        await client.segment(b, [Prompt(box=b.target_boxes[0])])  # evicts a from the LRU
        third = await client.segment(a, [Prompt(box=a.target_boxes[0])])
        await client.aclose()
        return first, again, third

    first, again, third = run(go())
    assert sent == ["b64", "sha256", "b64", "sha256", "b64"]
    assert client.stats()["resends"] == 1 and client.stats()["failures"] == 0
    assert first[0].rle == again[0].rle == third[0].rle


def test_chunks_large_prompt_lists(sam, samples):
    url = sam()
    client = _client(url, max_prompts_per_request=2)
    sent = _record_images(client)
    s = samples[2]
    x1, y1, x2, y2 = s.target_boxes[0]
    prompts = [Prompt(box=(x1 - d, y1 - d, x2 + d, y2 + d)) for d in range(5)]
    segs = run(client.segment(s, prompts))
    assert len(segs) == 5 and all(g.ok for g in segs)
    assert sent == ["b64", "sha256", "sha256"]


FULL = Prompt(text="the Red cup", box=(10, 12, 40, 50), points=((20, 30),), point_labels=(1,))


@pytest.mark.parametrize("mode, sent", [
    ("text", Prompt(text="the red cup")),
    ("text_box", Prompt(text="the red cup", box=(10, 12, 40, 50))),
    ("box", Prompt(box=(10, 12, 40, 50))),
    ("box_points", Prompt(box=(10, 12, 40, 50), points=((20, 30),), point_labels=(1,))),
])
def test_each_prompt_mode_sends_its_parts(mode, sent):
    assert reduce_prompt(FULL, mode_parts(mode)) == sent
    assert set(PROMPT_MODES) == {"text", "text_box", "box", "box_points"}
    assert DEFAULT_PROMPT_MODE == "text_box"  # SAM3's concept path, the box as its exemplar


def test_the_mode_decides_what_reaches_the_server(sam, samples):
    url = sam()
    s = samples[0]
    box = s.target_boxes[0]
    sent = {}
    for mode in ("text", "box", "box_points"):
        client = _client(url, prompt_mode=mode)
        post = client._post

        async def recording(payload, post=post, mode=mode):
            sent[mode] = payload["prompts"]
            return await post(payload)

        client._post = recording
        segs = run(client.segment(s, [Prompt(text="x", box=box, points=((box[0] + 2,
                                                                           box[1] + 2),),
                                             point_labels=(1,)), Prompt(box=box)]))
        if mode == "text":  # the phrase alone; the box-only hypothesis has nothing to send
            assert segs[0].error.startswith("execute:prompt")  # classical reads no text
            assert segs[1].error.startswith("execute:empty_prompt")
        else:
            assert segs[0].ok and segs[1].ok
    assert sent["text"] == [{"text": "x"}]
    assert [set(p) for p in sent["box"]] == [{"box"}]  # one prompt left after dedupe
    assert [set(p) for p in sent["box_points"]] == [{"box", "points", "point_labels"}, {"box"}]


def test_instances_are_chosen_with_the_hypothesis_box_in_every_mode():
    """In text mode the box is not sent, but it still picks the referred instance among
    SAM3's matches of the phrase (union_in_box), as it does in text_box mode."""
    h, w = 40, 60
    left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
    left[5:15, 2:12] = True
    right[5:15, 40:50] = True
    result = {"instances": [_inst(right, 0.9), _inst(left, 0.6)], "error": None}
    sent = Prompt(text="cup")  # what text mode sent
    seg = choose_instances(result, sent, "union_in_box", h, w, select_box=(0, 0, 20, 20))
    assert np.array_equal(masks.decode(seg.rle), left)


def test_an_unknown_prompt_mode_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        SamClient("http://x", prompt_mode="mask")
    msg = str(err.value)
    assert "\n" not in msg and "executor.prompt_mode" in msg and "'mask'" in msg
    assert all(m in msg for m in PROMPT_MODES)
    with pytest.raises(TypeError):  # the raw parts list is gone: the mode is the one setting
        SamClient("http://x", prompt_parts=["box"])


def test_what_each_backend_can_serve():
    classical = {"text": False, "box": True, "points": True, "multimask": False}
    sam3 = {"text": True, "box": True, "points": True, "multimask": True}
    sam3_no_points = {"text": True, "box": False, "points": False, "multimask": False}
    assert [m for m in PROMPT_MODES if mode_unsupported(m, classical) is None] == \
        ["box", "box_points"]
    assert all(mode_unsupported(m, sam3) is None for m in PROMPT_MODES)
    assert [m for m in PROMPT_MODES if mode_unsupported(m, sam3_no_points) is None] == \
        ["text", "text_box"]
    why = mode_unsupported("text_box", classical)
    assert "text" in why and "box|box_points" in why and "\n" not in why
    assert mode_unsupported("box", None) is not None  # no capabilities: nothing is assumed


@pytest.mark.parametrize("mode", ["text", "text_box"])
def test_a_mode_the_backend_cannot_serve_fails_preflight_in_one_line(sam, samples, mode):
    url = sam()
    client = _client(url, prompt_mode=mode)
    (problem,) = run(client.preflight())
    assert f"prompt_mode={mode}" in problem and "classical" in problem and "\n" not in problem
    assert "executor.prompt_mode=box|box_points" in problem
    # without the preflight (a library caller), the first use says so for each prompt and
    # sends nothing: a failure as data, which the run's stage guard stops on
    client = _client(url, prompt_mode=mode)
    client.identity()
    segs = run(client.segment(samples[0], [Prompt(text="x", box=samples[0].target_boxes[0])]))
    assert segs[0].error.startswith("execute:mode_unsupported")
    assert client.stats()["requests"] == 0
    assert run(_client(url, prompt_mode="box_points").preflight()) == []


def test_the_mode_is_in_the_identity(sam):
    url = sam()
    idents = {m: _client(url, prompt_mode=m).identity() for m in PROMPT_MODES}
    assert [i["prompt_mode"] for i in idents.values()] == list(PROMPT_MODES)
    assert len({repr(sorted(i.items())) for i in idents.values()}) == len(PROMPT_MODES)


def test_identity_comes_from_the_server_and_not_the_url(sam):
    url = sam()
    ident = _client(url).identity()
    assert ident["server"]["backend"] == "classical"
    assert ident["server"]["identity"]["backend"] == "classical"
    assert ident["instance_policy"] == "union_in_box"
    assert "127.0.0.1" not in str(ident)
    assert _client(url, instance_policy="top1").identity() != ident
    pinned = _client("http://127.0.0.1:1", info=ident["server"])  # offline: nothing contacted
    assert pinned.identity() == ident


def test_unreachable_identity_is_marked_and_the_client_refuses_to_segment(samples):
    client = _client(f"http://127.0.0.1:{free_port()}", preflight_timeout_s=2)
    assert client.identity()["server"] == {"unresolved": True}
    with pytest.raises(EndpointError, match="unreachable"):
        run(client.segment(samples[0], [Prompt(box=(1, 1, 20, 20))]))


def test_a_preflight_records_the_identity_an_offline_client_reads_back(sam, tmp_path):
    url, down = sam(), f"http://127.0.0.1:{free_port()}"
    live = _client(url, info_file=tmp_path / "info.json", prompt_mode="box")
    assert run(live.preflight()) == []
    ident = live.identity()
    assert ident["server"]["backend"] == "classical"
    # same URL, server gone; and another host, as a cluster's server moves (one identity seen)
    for where in (url, down):
        again = _client(where, info_file=tmp_path / "info.json", preflight_timeout_s=1,
                        prompt_mode="box")
        assert again.identity() == ident and again.identity_problem() is None
    # two servers of different identities recorded: an unknown URL cannot pick one
    recorded = RecordedInfo(tmp_path / "info.json")
    recorded.put("http://other:1", {**live._info, "backend": "sam3"})
    assert recorded.get(url)["backend"] == "classical" and recorded.get(down) is None
    lost = _client(down, info_file=tmp_path / "info.json", preflight_timeout_s=1, prompt_mode="box",
                   retry={"attempts": 1})
    assert lost.identity()["server"] == {"unresolved": True}
    assert "info.json records no identity" in lost.identity_problem()
    with pytest.raises(PreflightError, match="identity of a model"):
        Models(planner=object(), executor=lost, verifier=object()).require_identities()


def test_pinned_identity_mismatch_fails_preflight(sam):
    url = sam()
    client = _client(url, info={"backend": "sam3", "model": "facebook/sam3", "identity": {}})
    (problem,) = run(client.preflight())
    assert "pins" in problem and "classical" in problem
    assert run(_client(url, prompt_mode="box").preflight()) == []


def test_token_is_sent_and_a_401_is_not_retried(sam, samples):
    url = sam(token="s3cret")
    s = samples[0]
    bad = _client(url)
    with pytest.raises(EndpointError, match="401 unauthorized"):
        run(bad.segment(s, [Prompt(box=s.target_boxes[0])]))
    assert bad.stats()["requests"] == 1 and bad.stats()["failures"] == 1
    good = _client(url, token="s3cret")
    assert run(good.segment(s, [Prompt(box=s.target_boxes[0])]))[0].ok


def _inst(mask, score):
    return {"rle": masks.encode(mask), "score": score, "box": list(masks.bbox(mask))}


def test_instance_policies():
    h, w = 50, 60
    a = np.zeros((h, w), bool)
    a[5:15, 5:15] = True  # inside the prompt box
    b = np.zeros((h, w), bool)
    b[20:30, 8:18] = True  # inside too
    c = np.zeros((h, w), bool)
    c[30:45, 40:58] = True  # outside, best score
    result = {"instances": [_inst(a, 0.6), _inst(c, 0.9), _inst(b, 0.5)], "error": None}
    prompt = Prompt(text="cups", box=(0, 0, 25, 35))
    top = choose_instances(result, prompt, "top1", h, w)
    assert np.array_equal(masks.decode(top.rle), c) and top.score == 0.9
    inbox = choose_instances(result, prompt, "union_in_box", h, w)
    assert np.array_equal(masks.decode(inbox.rle), a | b) and inbox.score == 0.6
    assert inbox.meta == {"instances": 3, "merged": 2}
    allm = choose_instances(result, prompt, "union", h, w)
    assert np.array_equal(masks.decode(allm.rle), a | b | c)
    assert allm.box == masks.bbox(a | b | c)
    nobox = choose_instances(result, Prompt(text="cups"), "union_in_box", h, w)
    assert np.array_equal(masks.decode(nobox.rle), c)
    none = choose_instances({"instances": [], "error": None}, prompt, "top1", h, w)
    assert none.ok and masks.area(none.rle) == 0 and none.score == 0.0
    err = choose_instances({"instances": [], "error": "boom"}, prompt, "top1", h, w)
    assert not err.ok and err.error == "execute:prompt boom"
    wrong = choose_instances(result, prompt, "top1", h + 1, w)
    assert wrong.error.startswith("execute:bad_mask_size")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="instance_policy"):
        SamClient("http://x", instance_policy="biggest")
    with pytest.raises(ValueError, match="prompt_mode"):
        SamClient("http://x", prompt_mode="points")


# --- malformed 200s (issue 14): a broken body is a transport failure, retried ----------------

BODY_FAULTS = ("cut", "truncate", "garbage", "shape")


def _segment_all(client, samples):
    async def go():
        out = [await client.segment(s, [Prompt(box=b) for b in s.target_boxes] +
                                    [Prompt(box=(2, 2, 40, 30)), Prompt(box=(50, 40, 150, 110))])
               for s in samples]
        await client.aclose()
        return out

    return [[(g.rle, g.score, g.box, g.error) for g in segs] for segs in run(go())]


def test_malformed_200s_are_retried_to_the_clean_answer(sam, samples):
    """Bodies cut short, not JSON or of another shape are what an overloaded server or a proxy
    returns: the client asks again and gets exactly the clean answers, and nothing failed."""
    url = sam(image_cache_size=0)
    clean = _segment_all(_client(url), samples)
    plan = FaultPlan.even(0.4, kinds=BODY_FAULTS, seed=2)
    with FaultProxy(url, plan, script=[*BODY_FAULTS, "shape", "shape"]) as proxy:
        client = _client(proxy.url, retry={"attempts": 10, "base_delay_s": 0.01})
        faulty = _segment_all(client, samples)
    assert faulty == clean
    assert set(proxy.injected) == set(BODY_FAULTS)
    st = client.stats()
    assert st["retries"] == sum(proxy.injected.values()) and st["failures"] == 0


@pytest.mark.parametrize("body", [
    b"", b'{"results": [{"instances": []', b"[1]", b'{"results": null}', b'{"results": []}',
    b'{"results": [{"instances": []}, {"instances": []}]}', b'{"results": ["x"]}',
    b'{"results": [{"instances": {"rle": 1}}]}', b'{"results": [{"instances": [{"score": 1}]}]}',
    b'{"results": [{"instances": [], "error": 3}]}'])
def test_a_body_that_is_no_segmentation_is_undecodable(body):
    with pytest.raises(UndecodableReply) as err:
        segment_answer(body, 1, "http://sam/v1/segment")
    assert err.value.retryable


def test_a_well_formed_answer_is_an_answer_whatever_it_says():
    """An empty result or a prompt error is the model's answer, not a broken body."""
    body = (b'{"results": [{"instances": [], "error": null}, {"instances": null, "error": '
            b'"bad box"}, {"instances": [{"rle": {"size": [4, 4], "counts": "04"}}]}]}')
    assert len(segment_answer(body, 3, "here")["results"]) == 3
