"""Reading a judgement out of a (thinking) chat model's reply: pure functions.

Where the reasoning is depends on the server: vLLM with a reasoning parser puts it in
`message.reasoning` (older releases: `reasoning_content`); without a parser it stays in
`content` up to the last `</think>` (Qwen3 thinking templates open `<think>` in the prompt, so
only the closing tag appears). In every case vLLM's `logprobs.content` covers all generated
tokens, reasoning included, so the answer token is looked for after the end of the reasoning,
never inside it. A reply cut off at max_tokens (`finish_reason=length`) has no verdict at all:
with the template's `<think>` in the prompt and no reasoning parser, it carries no tag, and
whatever "no" its reasoning contains must not be read as the answer (the caller checks).

The verdict is the final one of the answer part (`final_verdict`): "There is no overlap, so:
**yes**" answers yes; an answer that gives both verdicts as answers ("Yes. No. Yes.") has none
(ambiguous: unparseable, never scored, not even from logprobs). Its first token may be a
sub-word piece ("y" + "es"), so the score is read at the token holding the verdict's first
character, each side counting its spellings and its leading pieces ("Yes", " yes", "**Yes",
"y", "ye"...): p(yes) / (p(yes) + p(no)). When only one side is in the top-K list, the other is
bounded by min(smallest listed probability, unlisted mass) and that bound is used (meta
`bounded`), so confident answers still rank rather than all tying at 1.0. vLLM lists
grammar-masked tokens with logprob -9999.0: those are not candidates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_END = "</think>"
THINK_START = "<think>"
MASKED_LOGPROB = -9999.0
"""What vLLM reports for a token a grammar (structured output) forbade: no probability."""


RAW_CAP = 16 * 1024
"""Characters of one raw model text (answer, reasoning, whole reply) kept in records and the
cache: a 10 MB reply must not become a 40 MB plan segment. Parsing reads the full text first."""
PARSE_CAP = 4 * 1024 * 1024
"""The longest verifier answer parsed (linear time: well under a second at this size, off the
event loop): a thinking model's whole 40960-token budget is under 200k characters, and a 1 MB
answer still has its final verdict read, so only hostile text is refused (`verify:too_long`),
and parsing work stays bounded."""


def capped(text: str, cap: int = RAW_CAP) -> str:
    """`text` when it fits in `cap` characters, else its head (3/4) and tail (1/4) around a line
    naming the cut: the tail is where a reply's final answer is, so re-reading it still works."""
    if len(text) <= cap:
        return text
    tail = cap // 4
    head = cap - tail
    return f"{text[:head]}\n[... {len(text) - cap} characters cut ...]\n{text[len(text) - tail:]}"


def cap_raw(meta: dict[str, Any], name: str, text: str, cap: int = RAW_CAP) -> str:
    """`capped(text)`; when it was cut, `meta[name + "_chars"]` records the full length (absent
    when nothing was cut: then the stored text is the whole text, and records stay as they were).
    """
    if len(text) <= cap:
        return text
    meta[f"{name}_chars"] = len(text)
    return capped(text, cap)


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


def _message_text(message: Any, name: str) -> str | None:
    value = getattr(message, name, None)
    if value is None:
        value = (getattr(message, "model_extra", None) or {}).get(name)
    return value if isinstance(value, str) else None


def reply_of(message: Any) -> Reply:
    """`split_reasoning` of an OpenAI chat message, reading vLLM's extra fields (`reasoning`,
    older `reasoning_content`) whether the client library typed them or left them in
    `model_extra`."""
    if message is None:
        return Reply("", "", "none")
    return split_reasoning(_message_text(message, "content"), _message_text(message, "reasoning"),
                           _message_text(message, "reasoning_content"))


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
        """token -> logprob over the top-K list plus the sampled token (first spelling wins);
        vLLM's masked-token sentinel (-9999.0) is no probability and is left out."""
        out: dict[str, float] = {}
        for tok, lp in ((self.token, self.logprob), *self.top):
            if (tok not in out and lp is not None and math.isfinite(lp)
                    and lp > MASKED_LOGPROB):
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
YES_PIECES = frozenset({"y", "ye", "yes"})
NO_PIECES = frozenset({"n", "no"})
"""A side's spellings and the pieces a tokenizer may split it into ("y" + "es"): at the
verdict's first token, p of a leading piece is p of that answer."""


def is_yes_no(t: str) -> bool:
    return t in YES or t in NO


_VERDICT = re.compile(r"\b(yes|no)\b", re.I)
_LABELLED = re.compile(r"(\\boxed\{|\banswer\s*(?:is)?\s*[:=]?\s*[*_`\"']*|"
                       r"\bverdict\s*(?:is)?\s*[:=]?\s*[*_`\"']*)\s*(yes|no)\b", re.I)
_BOLD = re.compile(r"(\*\*|__)\s*(yes|no)\b", re.I)
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n])[\s*_>#`\"'(-]*(yes|no)\b", re.I)
_SENTENCE = re.compile(r"[^.!?:;\n]+")
_MARKUP = " \t*_`\"'()[]{}<>#-"


@dataclass(frozen=True)
class FinalVerdict:
    """Where an answer's verdict word starts (None: there is none), and whether it has two."""

    offset: int | None
    ambiguous: bool = False


def _standalone(answer: str) -> set[str]:
    """The verdicts given as whole sentences: a sentence (text between . ! ? : ; or a line
    break) that is only "yes" or "no" inside markup ("Yes.", "**No**", "\\boxed{yes}")."""
    out = set()
    for m in _SENTENCE.finditer(answer):
        text = m.group(0).strip()
        if text.startswith("\\boxed{"):
            text = text[len("\\boxed{"):]
        word = text.strip(_MARKUP).lower()
        if word in ("yes", "no"):
            out.add(word)
    return out


def final_verdict(answer: str) -> FinalVerdict:
    """The final verdict (yes or no) of an answer text.

    Ambiguous when the evidence that decides it holds both verdicts: the labelled verdicts
    ("Answer: yes", "Final answer: no", "verdict: yes", "\\boxed{no}") when there are any, else
    the standalone ones (`_standalone`: sentences that are only "Yes." or "No."). "…Yes. No.
    Yes." is ambiguous; "Is it the cat? Yes. Is it whole? No. Final answer: no" is no, the
    label deciding; reasoning-like sentences ("There is no overlap", "No, wait") are never
    standalone, so a clear verdict after them stays readable.

    Otherwise, in order: the last labelled verdict; the last bold one ("**yes**", "__no__");
    the last one that starts a sentence or line ("Yes. There is no other object." answers yes);
    the last yes/no word at all ("..., so yes").
    """
    labelled = list(_LABELLED.finditer(answer))
    said = ({m.group(2).lower() for m in labelled} if labelled else _standalone(answer))
    if len(said) > 1:
        return FinalVerdict(None, ambiguous=True)
    for found in (labelled, *(list(p.finditer(answer)) for p in (_BOLD, _SENTENCE_START,
                                                                _VERDICT))):
        if found:
            m = found[-1]
            return FinalVerdict(m.start(len(m.groups())))
    return FinalVerdict(None)


def verdict_offset(answer: str) -> int | None:
    """Character offset of the final verdict in an answer text; None when there is none or it
    is ambiguous (`final_verdict`)."""
    return final_verdict(answer).offset


def token_at(tokens: Sequence[str], offset: int) -> int | None:
    """Index of the token holding character `offset` of the concatenated tokens."""
    pos = 0
    for i, tok in enumerate(tokens):
        if pos <= offset < pos + len(tok):
            return i
        pos += len(tok)
    return None


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
    p_yes = sum(p for t, p in probs.items() if norm_token(t) in YES_PIECES)
    p_no = sum(p for t, p in probs.items() if norm_token(t) in NO_PIECES)
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


_RATING = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?)|out of\s+(\d+(?:\.\d+)?))?", re.I)


def parse_yes_no(answer: str) -> float | None:
    """1.0 or 0.0 for the final verdict of the answer (`final_verdict`); None without one or
    when it is ambiguous (the verifier records either as `verify:unparseable`)."""
    k = verdict_offset(answer)
    if k is None:
        return None
    return 1.0 if answer[k:k + 3].lower() == "yes" else 0.0


_LABELLED_NUMBER = re.compile(r"(?:\\boxed\{|\b(?:answer|verdict|rating)\s*(?:is)?\s*[:=]?"
                              r"\s*[*_`\"']*)\s*(\d+(?:\.\d+)?)", re.I)
_DIGIT = re.compile(r"\d")


def _labelled_number(answer: str) -> tuple[re.Match[str] | None, bool]:
    """The last labelled number ("Answer: 2", "Rating: 7/10", "\\boxed{1}"), and whether the
    labelled numbers disagree ("\\boxed{1} \\boxed{2}": then there is none)."""
    labelled = list(_LABELLED_NUMBER.finditer(answer))
    if len({float(m.group(1)) for m in labelled}) > 1:
        return None, True
    return (labelled[-1] if labelled else None), False


def final_number(answer: str) -> FinalVerdict:
    """Where the number an answer gives (a rating, a candidate's number) starts: its labelled
    number when it has one, ambiguous when the labels disagree; else its first digit."""
    label, ambiguous = _labelled_number(answer)
    if ambiguous:
        return FinalVerdict(None, ambiguous=True)
    if label is not None:
        return FinalVerdict(label.start(1))
    digit = _DIGIT.search(answer)
    return FinalVerdict(digit.start() if digit else None)


def number_token(tokens: Sequence[str], start: int) -> int | None:
    """Index of the token holding the first digit of the number the answer from character
    `start` gives (`final_number`), else the first digit token after it; None when there is
    none or the labels disagree."""
    at = final_number("".join(tokens)[start:]).offset
    if at is None:
        return None
    i = token_at(tokens, start + at)
    if i is not None and is_digit_token(norm_token(tokens[i])):
        return i
    return answer_index(tokens, start + at, is_digit_token)


def parse_rating(answer: str, max_rating: int) -> float | None:
    """"7/10", "7 out of 10", "Rating: 7" -> 0.7 (for max_rating 10): the labelled rating when
    there is one (None when labels disagree), else the first number."""
    label, ambiguous = _labelled_number(answer)
    if ambiguous:
        return None
    m = _RATING.search(answer) if label is None else _RATING.match(answer, label.start(1))
    if m is None:
        return None
    value = float(m.group(1))
    denom = m.group(2) or m.group(3)
    scale = float(denom) if denom else float(max_rating)
    if scale <= 0 or value < 0 or value > scale:
        return None
    return value / scale


def choice_probs(tok: TokenLogprob, k: int) -> list[float] | None:
    """P(option 1..k) at the answer's digit token (pairwise: k = 2, listwise: k marks),
    renormalised over the options listed; None when none is."""
    probs = [0.0] * k
    for t, lp in tok.distribution().items():
        n = norm_token(t)
        if is_digit_token(n) and 1 <= int(n) <= k and probs[int(n) - 1] == 0.0:
            probs[int(n) - 1] = math.exp(lp)
    total = sum(probs)
    return [p / total for p in probs] if total > 0 else None


_OPTION = re.compile(r"(?<![\d.])(\d+)(?![\d.])")


def parse_choice(answer: str, k: int) -> int | None:
    """The option (1..k) the answer names: its labelled number ("Answer: 2", "\\boxed{1}"; None
    when labels disagree or name no option), else its last standalone number in range."""
    label, ambiguous = _labelled_number(answer)
    if ambiguous:
        return None
    if label is not None:
        value = label.group(1)
        return int(value) if value.isdecimal() and 1 <= int(value) <= k else None
    found = [int(m) for m in _OPTION.findall(answer) if 1 <= int(m) <= k]
    return found[-1] if found else None
