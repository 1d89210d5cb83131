"""Client settings that change answers or requests: cache identity, retries, sampling, ratings."""

from __future__ import annotations

import asyncio

import pytest

from rescue.models import answers
from rescue.models.http import Endpoint, RetryPolicy
from rescue.models.openai_planner import OpenAIPlanner

PLAN_PROMPT = {"user": 'Find "{query}" as JSON'}


def test_planner_identity_names_the_base_seed():
    # hypothesis i is sampled with seed base_seed + i: a run with another seed must not be
    # served the first run's hypotheses from the cache
    a = OpenAIPlanner("planner", "http://x/v1", PLAN_PROMPT, base_seed=0)
    b = OpenAIPlanner("planner", "http://x/v1", PLAN_PROMPT, base_seed=1)
    assert a.identity() != b.identity()
    assert a.identity()["base_seed"] == 0 and b.identity()["base_seed"] == 1


@pytest.mark.parametrize("attempts", [0, -1])
def test_retry_policy_without_a_single_attempt_is_refused(attempts):
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy.from_config({"attempts": attempts})


def test_one_attempt_means_no_retry():
    ep = Endpoint("x", "http://x", retry={"attempts": 1, "base_delay_s": 0.0})
    calls = []

    async def fn():
        calls.append(1)
        return "ok"

    assert asyncio.run(ep.call(fn)) == "ok" and calls == [1]


def test_rating_score_ignores_digit_like_tokens_int_cannot_read():
    # "²".isdigit() is True but int("²") raises: an odd top-logprob token must not crash
    tok = answers.TokenLogprob("7", -0.1, (("7", -0.1), ("²", -3.0), ("8", -2.5)))
    score = answers.rating_score([tok], 0, 10)
    assert score is not None and 0.7 < score < 0.8
    assert not answers.is_digit_token("²")
    assert answers.answer_index(["²", "7"], 0, answers.is_digit_token) == 1


def test_sampling_extra_cannot_take_over_the_fields_the_client_owns():
    from rescue.models.chat import Sampling

    with pytest.raises(ValueError, match=r"may not set \['seed'\]"):
        Sampling.from_config({"extra": {"seed": 3}})
    assert Sampling.from_config({"extra": {"min_tokens": 2}}).extra == {"min_tokens": 2}
