"""Client CPU work runs in the client's worker pool, once per mask: never on the event loop."""

from __future__ import annotations

import asyncio
import threading

import cv2
import numpy as np
import orjson

from rescue.models import openai_planner, replies
from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.workers import Memo, WorkerPool, cores
from rescue.records import reason_code
from rescue.sample import Sample


def _sample(sid="s", fill=90):
    img = np.full((40, 48, 3), fill, np.uint8)
    return Sample(sid, "the thing", img, np.zeros((40, 48), np.uint8))


def _mask(x):
    m = np.zeros((40, 48), bool)
    m[5:20, x:x + 10] = True
    return m


def test_views_are_drawn_in_the_pool_once_per_image_and_mask():
    v = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{views} {query}?",
                       overlay={"views": ["overlay", "crop"]})
    drawn: list[str] = []
    draw = v.view_urls

    def spy(image, mask):
        drawn.append(threading.current_thread().name)
        return draw(image, mask)

    v.view_urls = spy
    a, b = _mask(2), _mask(20)

    async def go():
        loop_thread = threading.current_thread().name
        out = [await v.views(_sample(), m) for m in (a, b, a, b.copy(), a)]
        other_image = await v.views(_sample(fill=91), a)  # same id and mask, other pixels
        v.pool.close()
        return loop_thread, out, other_image

    loop_thread, out, other_image = asyncio.run(go())
    assert len(drawn) == 3 and loop_thread not in drawn
    assert all(name.startswith("verifier-work") for name in drawn)
    assert out[0] == out[2] == out[4] and out[1] == out[3] and out[0] != out[1]
    assert len(out[0]) == 2 and other_image != out[0]
    assert out[0] == draw(_sample().image, a)  # what the pool drew is what render draws


def test_the_memo_keeps_the_most_recent_and_the_pool_the_cores():
    memo: Memo[int, str] = Memo(2)
    memo.put(1, "a")
    memo.put(2, "b")
    assert memo.get(1) == "a"  # 1 is now the most recent: 2 goes first
    memo.put(3, "c")
    assert memo.get(2) is None and memo.get(1) == "a" and memo.get(3) == "c"
    assert (memo.hits, memo.misses) == (3, 1)
    assert WorkerPool("p").workers == cores() >= 1
    assert WorkerPool("p", 3).workers == 3


def test_the_pool_runs_its_initializer_in_each_thread_before_any_work():
    started: list[str] = []
    pool = WorkerPool("init", 2, initializer=lambda: started.append(
        threading.current_thread().name))

    def work() -> bool:
        return threading.current_thread().name in started

    async def go():
        return await asyncio.gather(*(pool.run(work) for _ in range(8)))

    try:
        seen = asyncio.run(go())
    finally:
        pool.close()
    assert 1 <= len(started) <= 2 and all(n.startswith("init") for n in started)
    assert seen == [True] * 8  # each job ran after its own thread's initializer


def test_the_verifiers_pool_makes_opencv_serial():
    """The verifier's pool threads turn OpenCV's own threads off (`views.serial_opencv`:
    process-wide; the pool already fills the cores)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)
    v = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{views} {query}?",
                       overlay={"views": ["overlay", "crop"]})
    try:
        assert cv2.getNumThreads() == 4  # constructing a verifier changes nothing
        asyncio.run(v.views(_sample(), _mask(2)))
        assert cv2.getNumThreads() == 1
    finally:
        v.pool.close()
        cv2.setNumThreads(before)


# --- untrusted answers are parsed in the pool (issue 14, defect 6) ----------------------------

HOSTILE = 400_000
"""Characters of a hostile answer: a few hundred ms of parsing each, however bounded."""


def _reply(texts):
    body = {"choices": [{"index": k, "message": {"content": t}, "finish_reason": "stop"}
                        for k, t in enumerate(texts)],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}
    return replies.decode(orjson.dumps(body), n=len(texts))


def _while_ticking(client, call, spied):
    """Run `call()` beside a coroutine that ticks on the event loop; `spied` is the list the
    parse spy appends (thread, ticks when it began, ticks when it ended) to. Returns the
    loop's thread name and the call's result."""
    ticks = [0]

    async def go():
        stop = asyncio.Event()

        async def ticker():
            while not stop.is_set():
                ticks[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            return threading.current_thread().name, await call()
        finally:
            stop.set()
            await task
            client.pool.close()

    return ticks, go


def _spy(real, ticks, seen):
    def spy(*args, **kwargs):
        before = ticks[0]
        out = real(*args, **kwargs)
        seen.append((threading.current_thread().name, before, ticks[0]))
        return out
    return spy


def test_a_hostile_planner_answer_is_parsed_off_the_event_loop(monkeypatch):
    """400 KB of '[' per choice: while each is parsed, another coroutine keeps running."""
    planner = OpenAIPlanner("m", "http://127.0.0.1:9/v1", "{query}")

    async def create(what, **kwargs):
        return _reply(["[" * HOSTILE] * 2)

    planner.chat.create = create
    seen: list[tuple[str, int, int]] = []
    ticks, go = _while_ticking(planner, lambda: planner.plan(_sample(), [0, 1]), seen)
    monkeypatch.setattr(openai_planner, "parse_grounding",
                        _spy(openai_planner.parse_grounding, ticks, seen))
    loop_thread, hyps = asyncio.run(go())
    assert [reason_code(h.error) for h in hyps] == ["parse:too_long"] * 2
    assert [name.startswith("planner-work") for name, _, _ in seen] == [True, True]
    assert all(end > begin for _, begin, end in seen)  # the loop ticked during each parse
    assert loop_thread not in {name for name, _, _ in seen}


def test_a_hostile_verifier_answer_is_parsed_off_the_event_loop():
    verifier = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{views} {query}?",
                              logprobs=False)

    async def create(what, **kwargs):
        return _reply(["Yes. No. " * (HOSTILE // 9)])

    verifier.chat.create = create
    seen: list[tuple[str, int, int]] = []
    ticks, go = _while_ticking(verifier, lambda: verifier.verify(_sample(), _mask(4)), seen)
    verifier._read = _spy(verifier._read, ticks, seen)
    loop_thread, verdict = asyncio.run(go())
    assert verdict.score is None and reason_code(verdict.error) == "verify:unparseable"
    ((name, begin, end),) = seen
    assert name.startswith("verifier-work") and name != loop_thread
    assert end > begin


def test_a_short_verifier_answer_is_read_on_the_loop_and_a_long_one_in_the_pool():
    """A pool trip costs the loop more than reading a few kB: short replies are read inline;
    past `INLINE_SIZE` the reply goes to the pool, however it is measured (text or logprobs)."""
    from rescue.models import workers

    verifier = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{views} {query}?",
                              logprobs=False)
    short, long = "Looks right. Yes", "x " * workers.INLINE_SIZE + "Yes"
    for text in (short, long):
        body = replies.decode(orjson.dumps({"choices": [{
            "index": 0, "message": {"content": text}, "finish_reason": "stop"}]}))
        assert body.choices[0].size == len(text)
    entry = {"token": "a", "logprob": -0.1, "top_logprobs": []}
    many = replies.decode(orjson.dumps({"choices": [{
        "index": 0, "message": {"content": "Yes"}, "finish_reason": "stop",
        "logprobs": {"content": [entry] * 100}}]}))
    assert many.choices[0].size == 3 + 200 * 100 > workers.INLINE_SIZE
    real, threads = verifier._read, []

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    verifier._read = spy

    async def go(text):
        async def create(what, **kwargs):
            return _reply([text])

        verifier.chat.create = create
        return threading.current_thread().name, await verifier.verify(_sample(), _mask(4))

    loop_thread, verdict = asyncio.run(go(short))
    assert verdict.score == 1.0 and threads == [loop_thread]
    asyncio.run(go(long))
    verifier.pool.close()
    assert len(threads) == 2 and threads[1].startswith("verifier-work")
