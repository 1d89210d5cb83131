"""Reading a judgement out of a (thinking) chat model's reply: pure functions.

Where the reasoning is depends on the server: vLLM with a reasoning parser puts it in
`message.reasoning` (older releases: `reasoning_content`); without a parser it stays in
`content` up to the last `</think>` (Qwen3 thinking templates open `<think>` in the prompt, so
only the closing tag appears). In every case vLLM's `logprobs.content` covers all generated
tokens, reasoning included, so the answer token is the first yes/no (or digit) token after the
end of the reasoning, never one inside it.

Score from logprobs: p(yes) / (p(yes) + p(no)) at the answer token, each side summed over its
spellings ("Yes", " yes", "YES", "**Yes"...). When only one side is in the top-K list, the other
is bounded by min(smallest listed probability, unlisted mass) and that bound is used (meta
`bounded`), so confident answers still rank rather than all tying at 1.0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

THINK_END = "</think>"
THINK_START = "<think>"


@dataclass(frozen=True)
class Reply:
    reasoning: str
    answer: str
    placement: str  # "reasoning" | "reasoning_content" | "think_tag" | "unfinished" | "none"


def split_reasoning(content: str | None, reasoning: str | None = None,
                    reasoning_content: str | None = None) -> Reply:
    """The reasoning and the final answer of one message, wherever the server put them."""
    content = content or ""
    if reasoning:
        return Reply(reasoning.strip(), content.strip(), "reasoning")
    if reasoning_content:
        return Reply(reasoning_content.strip(), content.strip(), "reasoning_content")
    if THINK_END in content:
        before, after = content.rsplit(THINK_END, 1)
        return Reply(before.replace(THINK_START, "", 1).strip(), after.strip(), "think_tag")
    if THINK_START in content:  # thinking never finished (max_tokens): there is no answer
        return Reply(content.split(THINK_START, 1)[1].strip(), "", "unfinished")
    return Reply("", content.strip(), "none")


_PUNCT = "*_`\"'.,:;!()[]{}<>-"


def norm_token(token: str) -> str:
    return token.strip().strip(_PUNCT).strip().lower()


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as vLLM reports it: the sampled token and the top-K alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def distribution(self) -> dict[str, float]:
        """token -> logprob over the top-K list plus the sampled token (first spelling wins)."""
        out: dict[str, float] = {}
        for tok, lp in ((self.token, self.logprob), *self.top):
            if tok not in out and lp is not None and math.isfinite(lp):
                out[tok] = float(lp)
        return out


def reasoning_end(tokens: Sequence[str], reply: Reply) -> int:
    """Character offset (in the concatenated tokens) where the reasoning ends."""
    text = "".join(tokens)
    k = text.rfind(THINK_END)
    if k >= 0:
        return k + len(THINK_END)
    if reply.reasoning and reply.answer:
        # reasoning reported separately and no closing tag among the tokens: the answer is
        # the tail of the generated text
        k = text.rfind(reply.answer)
        if k >= 0:
            return k
        return max(0, len(text) - len(reply.answer))
    if reply.reasoning and not reply.answer:
        return len(text)  # no answer was generated
    return 0


def answer_index(tokens: Sequence[str], start: int, is_answer) -> int | None:
    """Index of the first token starting at or after character `start` for which
    `is_answer(normalised token)` holds."""
    pos = 0
    for i, tok in enumerate(tokens):
        if pos >= start and is_answer(norm_token(tok)):
            return i
        pos += len(tok)
    return None


YES = frozenset({"yes"})
NO = frozenset({"no"})


def is_yes_no(t: str) -> bool:
    return t in YES or t in NO


@dataclass(frozen=True)
class YesNo:
    score: float
    p_yes: float
    p_no: float
    bounded: bool


def yes_no_score(tok: TokenLogprob) -> YesNo | None:
    """p(yes) / (p(yes) + p(no)) at one token position; None when neither is listed."""
    dist = tok.distribution()
    probs = {t: math.exp(lp) for t, lp in dist.items()}
    p_yes = sum(p for t, p in probs.items() if norm_token(t) in YES)
    p_no = sum(p for t, p in probs.items() if norm_token(t) in NO)
    if p_yes <= 0.0 and p_no <= 0.0:
        return None
    bounded = False
    if p_yes <= 0.0 or p_no <= 0.0:
        bound = min(min(probs.values()), max(0.0, 1.0 - sum(probs.values())))
        if p_yes <= 0.0:
            p_yes = bound
        else:
            p_no = bound
        bounded = True
    return YesNo(p_yes / (p_yes + p_no), p_yes, p_no, bounded)


def is_digit_token(t: str) -> bool:
    return t.isdecimal()  # not isdigit: "²" is a digit that int() cannot read


def rating_score(tokens: Sequence[TokenLogprob], i: int, max_rating: int) -> float | None:
    """Expected rating / max_rating from the digit tokens at position i.

    Qwen's tokenizer writes numbers digit by digit, so "10" is "1" then "0": when the sampled
    answer is 10, the "1" alternative is read as 10 (it cannot tell 1 from 10 otherwise).
    """
    tok = tokens[i]
    follows_zero = (i + 1 < len(tokens) and norm_token(tok.token) == "1"
                    and tokens[i + 1].token.strip() == "0")
    num = den = 0.0
    for t, lp in tok.distribution().items():
        n = norm_token(t)
        if not is_digit_token(n):
            continue
        value = int(n)
        if n == "1" and follows_zero:
            value = 10
        if value > max_rating:
            continue
        p = math.exp(lp)
        num += p * value
        den += p
    if den <= 0.0:
        return None
    return min(1.0, max(0.0, num / den / max_rating))


_YES_NO = re.compile(r"\b(yes|no)\b", re.I)
_RATING = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?)|out of\s+(\d+(?:\.\d+)?))?", re.I)


def parse_yes_no(answer: str) -> float | None:
    m = _YES_NO.search(answer)
    if m is None:
        return None
    return 1.0 if m.group(1).lower() == "yes" else 0.0


def parse_rating(answer: str, max_rating: int) -> float | None:
    """"7/10", "7 out of 10", "Rating: 7" -> 0.7 (for max_rating 10)."""
    m = _RATING.search(answer)
    if m is None:
        return None
    value = float(m.group(1))
    denom = m.group(2) or m.group(3)
    scale = float(denom) if denom else float(max_rating)
    if scale <= 0 or value < 0 or value > scale:
        return None
    return value / scale
