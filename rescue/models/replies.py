"""A chat completion body decoded by the client itself, keeping only what a verdict or a
hypothesis reads.

The openai SDK builds a pydantic object for every logprob entry: a thinking verifier's reply
carries 20 alternatives for each of hundreds of tokens, and building those objects was a third
of the client's CPU (issue 16). Here the body is parsed once with orjson and the logprob entries
stay plain dicts; `Choice.tokens()` converts an entry to an `answers.TokenLogprob` only when a
reader indexes it (usually the one answer token). The objects keep the SDK's attribute names
(`choices[].message.content`, `.finish_reason`, `.index`, `.logprobs`, `.usage`), so readers
work on either.

A 200 whose body is not a chat completion (not JSON, cut short, no `choices` list, a choice that is
not an object or has no message, fewer or more choices than the request's `n`) is a retryable
`TransportError` (`http.UndecodableReply`): what arrived was garbled on the way or by an
overloaded server, and a retry may pass. What a well-formed choice says is the model's answer,
however bad: its readers judge it, and it is never retried.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import orjson

from rescue.models.answers import TokenLogprob
from rescue.models.http import UndecodableReply


@dataclass(frozen=True)
class Message:
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class Tokens(Sequence[TokenLogprob]):
    """vLLM's `logprobs.content`, converted entry by entry on access: the readers look at every
    token's text (`texts`) but at the alternatives of one or two tokens only."""

    def __init__(self, entries: Sequence[Mapping[str, Any]]):
        self._entries = entries
        self.texts = [str(e.get("token", "")) for e in entries]

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, i: int) -> TokenLogprob: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenLogprob]: ...

    def __getitem__(self, i: int | slice) -> TokenLogprob | list[TokenLogprob]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        e = self._entries[i]
        top = tuple((str(a.get("token", "")), float(a.get("logprob", 0.0)))
                    for a in (e.get("top_logprobs") or ()))
        return TokenLogprob(self.texts[i], float(e.get("logprob", 0.0)), top)

    def __iter__(self) -> Iterator[TokenLogprob]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class Choice:
    index: int
    message: Message
    finish_reason: str | None
    logprobs: Mapping[str, Any] | None = None  # the server's JSON ({"content": [...]})

    @property
    def size(self) -> int:
        """About how much a reader of this choice scans: its characters, and a logprob entry
        (20 alternatives) as 200 of them. What decides whether it is read on the event loop
        (`workers.WorkerPool.parse`)."""
        m = self.message
        chars = sum(len(t) for t in (m.content, m.reasoning, m.reasoning_content) if t)
        return chars + 200 * len(self._entries())

    def tokens(self) -> Tokens:
        """The generated tokens with their logprobs (empty without logprobs)."""
        return Tokens(self._entries())

    def _entries(self) -> list[Any]:
        content = (self.logprobs or {}).get("content")
        return content if isinstance(content, list) else []


@dataclass(frozen=True)
class ChatReply:
    """One chat completion. `usage` is the server's JSON as sent (prompt_tokens,
    completion_tokens, completion_tokens_details.reasoning_tokens), for compute accounting."""

    choices: tuple[Choice, ...]
    usage: Mapping[str, Any] = field(default_factory=dict)
    model: str = ""

    @property
    def prompt_tokens(self) -> int | None:
        return _int(self.usage.get("prompt_tokens"))

    @property
    def completion_tokens(self) -> int | None:
        return _int(self.usage.get("completion_tokens"))

    @property
    def reasoning_tokens(self) -> int | None:
        details = self.usage.get("completion_tokens_details")
        return _int(details.get("reasoning_tokens")) if isinstance(details, Mapping) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(d: Mapping[str, Any], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def decode(body: bytes | str, where: str = "chat completion", n: int | None = None
           ) -> ChatReply:
    """The ChatReply in a 200's body; `UndecodableReply` when it is not one, or (given the
    request's `n`) when it does not hold choices 0..n-1 (vLLM always answers all n)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        head = bytes(body[:120]) if isinstance(body, bytes) else body[:120].encode()
        raise UndecodableReply(where, f"a 200 whose body is not JSON ({exc}): {head!r}"
                               ) from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise UndecodableReply(where, f"a 200 without a choices list: {str(data)[:120]!r}")
    choices = []
    for k, c in enumerate(data["choices"]):
        if not isinstance(c, dict):
            raise UndecodableReply(where, f"choice {k} is not an object: {str(c)[:80]!r}")
        msg = c.get("message")
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str | None):
            raise UndecodableReply(where, f"choice {k} has no message object: {str(c)[:80]!r}")
        logprobs = c.get("logprobs")
        index = c.get("index", k)
        choices.append(Choice(index=index if isinstance(index, int) else k,
                              message=Message(_text(msg, "content"), _text(msg, "reasoning"),
                                              _text(msg, "reasoning_content")),
                              finish_reason=_text(c, "finish_reason"),
                              logprobs=logprobs if isinstance(logprobs, dict) else None))
    if n is not None and sorted(c.index for c in choices) != list(range(n)):
        raise UndecodableReply(where, f"a 200 with choices {[c.index for c in choices][:20]} "
                               f"for n={n}")
    usage = data.get("usage")
    return ChatReply(tuple(choices), usage if isinstance(usage, dict) else {},
                     str(data.get("model") or ""))


def summed_usage(replies: Sequence[Any]) -> dict[str, int]:
    """The token counts of several replies of one judgement added up (a two-step verdict's
    continuation is a second request: its prompt is counted as the server counts it, though
    its prefix is cached)."""
    total = {"prompt_tokens": 0, "completion_tokens": 0}
    reasoning = 0
    for r in replies:
        usage = getattr(r, "usage", None)
        usage = usage if isinstance(usage, Mapping) else {}
        for key in total:
            total[key] += _int(usage.get(key)) or 0
        details = usage.get("completion_tokens_details")
        if isinstance(details, Mapping):
            reasoning += _int(details.get("reasoning_tokens")) or 0
    return {**total, "completion_tokens_details": {"reasoning_tokens": reasoning}}
