"""Client CPU work runs in the client's worker pool, once per mask: never on the event loop."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.workers import Memo, WorkerPool, cores
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
    assert all(name.startswith("verifier-views") for name in drawn)
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
