"""The verifier reads what a real vLLM sends (issue 8): truncation, final verdicts, sub-word
answers, masked-token sentinels. Choices are built in vLLM's own layout (the sampled token first
in `top_logprobs`, the EOS token last in `logprobs.content`)."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest

from rescue.models import answers
from rescue.models.openai_verifier import OpenAIVerifier

EOS = "<|im_end|>"


def _verifier(**kw):
    return OpenAIVerifier("m", "http://127.0.0.1:9/v1", "Q: {query}", **kw)


def _tok(token, p=0.9, alts=()):
    """One vLLM logprob entry: the sampled token first in top_logprobs, then alternatives."""
    lp = math.log(p)
    top = [NS(token=token, logprob=lp)] + [NS(token=t, logprob=a) for t, a in alts]
    return NS(token=token, logprob=lp, top_logprobs=top)


def _choice(tokens, *, finish="stop", reasoning=None):
    content_tokens = [t.token for t in tokens if t.token != EOS]
    text = "".join(content_tokens)
    content = text
    if reasoning is not None:  # a reasoning parser moved the reasoning out of content
        content = text.split("</think>", 1)[1] if "</think>" in text else ""
    msg = NS(content=content, reasoning=reasoning, model_extra={})
    return NS(message=msg, finish_reason=finish, logprobs=NS(content=tokens), index=0)


def _seq(*parts):
    """Generated tokens: a string is a confident token, anything else an entry as built."""
    return [_tok(p, 0.99) if isinstance(p, str) else p for p in parts]


def test_a_truncated_reply_without_tags_is_never_scored_from_its_reasoning():
    # Thinking template: <think> is in the prompt, so a reply cut off at max_tokens has no tag
    toks = _seq("There", " is", " ", _tok("no", 0.9, [("yes", math.log(0.01))]), " other",
                " object")
    v = _verifier().read(_choice(toks, finish="length"))
    assert v.score is None and v.error.startswith("verify:truncated")
    assert v.meta["truncated"] is True
    assert v.reasoning.startswith("There is no other object")


def test_a_truncated_answer_after_closed_reasoning_is_not_scored_either():
    toks = _seq("ok", "</think>", "\n\n", "The", " mask", _tok(" yes", 0.8))
    v = _verifier().read(_choice(toks, finish="length"))
    assert v.score is None and v.error.startswith("verify:truncated")


def test_the_final_verdict_of_the_answer_is_read_not_the_first_yes_or_no():
    toks = _seq("fine", "</think>", "\n\n", "There", " is", " ",
                _tok("no", 0.95, [("yes", math.log(0.02))]), " overlap", ",", " so", ":", " **",
                _tok("yes", 0.8, [("no", math.log(0.2))]), "**", EOS)
    v = _verifier().read(_choice(toks))
    assert v.source == "logprobs"
    assert v.score == pytest.approx(0.8)
    assert v.meta["answer_token"] == len(toks) - 3


def test_a_sub_word_answer_is_scored_from_its_first_piece():
    toks = _seq("done", "</think>", "\n\n",
                _tok("y", 0.6, [("yes", math.log(0.1)), ("no", math.log(0.3))]), "es", EOS)
    v = _verifier().read(_choice(toks))
    assert v.source == "logprobs"
    assert v.score == pytest.approx(0.7 / 1.0)
    assert v.meta["p_yes"] == pytest.approx(0.7) and v.meta["p_no"] == pytest.approx(0.3)


def test_the_masked_token_sentinel_is_no_probability():
    tok = _tok("Yes", 0.99, [("no", answers.MASKED_LOGPROB), ("maybe", math.log(0.005))])
    yn = answers.yes_no_score(answers.TokenLogprob(
        tok.token, tok.logprob, tuple((a.token, a.logprob) for a in tok.top_logprobs)))
    # the other side is bounded by the smallest *listed* probability, not by exp(-9999) = 0
    assert yn.bounded and yn.p_no == pytest.approx(0.005)
    assert yn.score == pytest.approx(0.99 / 0.995)


def test_reasoning_parser_layout_reads_the_answer_after_the_reasoning():
    toks = _seq("There", " is", " no", " doubt", "</think>", "\n\n",
                _tok("Yes", 0.7, [("No", math.log(0.3))]), EOS)
    v = _verifier().read(_choice(toks, reasoning="There is no doubt"))
    assert v.source == "logprobs" and v.score == pytest.approx(0.7)
    assert v.meta["reasoning_placement"] == "reasoning"


@pytest.mark.parametrize(("answer", "expected"), [
    ("There is no overlap with anything else, so: **yes**", 1.0),
    ("Yes. There is no other object.", 1.0),
    ("Final answer: no", 0.0),
    ("\\boxed{yes}", 1.0),
    ("It is unclear.", None),
])
def test_parsed_answers_take_the_final_verdict(answer, expected):
    assert answers.parse_yes_no(answer) == expected


@pytest.mark.parametrize("answer", [
    "The mask covers the cat. Yes. No. Yes.",          # issue 14: read as 1.0 before
    "Yes.\nNo.",
    "**Yes**. **No**.",
    "Yes. No. **Yes**",                                # bold does not outvote a bare "No."
    "Answer: yes. Answer: no.",                        # labels that disagree
    "\\boxed{yes} \\boxed{no}",
])
def test_conflicting_standalone_or_labelled_verdicts_are_ambiguous(answer):
    assert answers.final_verdict(answer).ambiguous
    assert answers.verdict_offset(answer) is None
    assert answers.parse_yes_no(answer) is None


@pytest.mark.parametrize(("answer", "expected"), [
    ("No, wait. Yes.", 1.0),                           # "No, wait" is reasoning, not a verdict
    ("No. Hmm, the left one is the dog, so the answer is **yes**", 1.0),  # the label decides
    ("Is it the cat? Yes. Is it whole? No. Final answer: no", 0.0),
    ("**No** other object is covered, so **yes**.", 1.0),
    ("No. No.", 0.0),                                  # repeated, not conflicting
])
def test_a_clear_final_verdict_after_reasoning_stays_readable(answer, expected):
    assert not answers.final_verdict(answer).ambiguous
    assert answers.parse_yes_no(answer) == expected


def test_an_ambiguous_answer_is_unparseable_even_with_logprobs():
    toks = _seq("ok", "</think>", "\n\n", "The", " mask", " covers", " the", " cat", ".", " ",
                _tok("Yes", 0.9, [("No", math.log(0.1))]), ".", " ", "No", ".", " ",
                _tok("Yes", 0.9, [("No", math.log(0.1))]), ".", EOS)
    v = _verifier().read(_choice(toks))
    assert v.score is None and not v.ok
    assert v.error.startswith("verify:unparseable")
    assert "Yes. No. Yes." in v.answer


# --- numbers: a rating or a candidate's number given twice, differently, is no answer -------

@pytest.mark.parametrize(("answer", "rating", "choice"), [
    ("\\boxed{1} \\boxed{2}", None, None),             # read as 0.1 and candidate 2 before
    ("Rating: 3. Rating: 9.", None, None),             # read as 0.3 before
    ("Answer: 1. Final answer: 2", None, None),
    ("Candidate 1 covers more. Answer: 2", 0.2, 2),    # the label decides, not the first digit
    ("I see 3 problems, so rating: 8/10", 0.8, None),  # read as 0.3 before
    ("Answer: 2. Yes, answer: 2.", 0.2, 2),            # repeated, not conflicting
    ("7/10", 0.7, None),
    ("so 2", 0.2, 2),
])
def test_labelled_numbers_decide_and_disagreeing_ones_are_ambiguous(answer, rating, choice):
    assert answers.parse_rating(answer, 10) == (pytest.approx(rating) if rating else None)
    assert answers.parse_choice(answer, 2) == choice
    assert answers.final_number(answer).ambiguous == (rating is None and choice is None)


def test_an_ambiguous_rating_is_unparseable_even_with_logprobs():
    toks = _seq("ok", "</think>", "\n\n", "\\boxed{", _tok("3", 0.9, [("9", math.log(0.1))]),
                "}", " ", "\\boxed{", _tok("9", 0.9, [("3", math.log(0.1))]), "}", EOS)
    v = _verifier(scale="rating", rating_max=10).read(_choice(toks))
    assert v.score is None and v.error.startswith("verify:unparseable")


def test_the_logprobs_of_the_labelled_digit_are_read_not_the_first_digit():
    toks = _seq("ok", "</think>", "\n\n", "Candidate", " ", _tok("1", 0.99), " is", " worse.",
                " Answer", ":", " ", _tok("2", 0.7, [("1", math.log(0.3))]), EOS)
    v = _verifier(scale="choice", call_shape="pairwise").read(_choice(toks))
    assert v.source == "logprobs" and v.score == pytest.approx(0.3)
    assert v.meta["answer_token"] == 11


def test_a_hostile_answer_longer_than_the_parse_cap_is_refused_unparsed(monkeypatch):
    calls = []
    monkeypatch.setattr(answers, "parse_yes_no", lambda a: calls.append(len(a)) or 1.0)
    long = "[" * (answers.PARSE_CAP + 1)
    msg = NS(content=long + " Yes.", reasoning=None, model_extra={})
    v = _verifier().read(NS(message=msg, finish_reason="stop", logprobs=None, index=0))
    assert v.score is None and v.error.startswith("verify:too_long") and calls == []
    ok = NS(content="The mask covers the cat. Yes.", reasoning=None, model_extra={})
    assert _verifier().read(NS(message=ok, finish_reason="stop", logprobs=None, index=0)).ok
