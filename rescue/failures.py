"""What a failed model call means for the run: permanent or transient, and when to give up.

A client says a call did not get through by raising `TransportError` (with the results that
did arrive, if any); that is the only exception the pipeline records as a failed request. Any
other exception from a client is a defect: it is not disguised as a network error, and the
sample it met is recorded `sample:crashed` (and not cached).

A transient failure (timeout, dropped connection, 5xx, 408/409/429) is recorded and not cached,
so a resumed run retries it. A permanent one, any other 4xx, is the server refusing this exact
request (too many `top_logprobs`, too many images, a prompt past `max_model_len`): asking again
gives the same answer, so it is cached like an answer and not retried on resume; a changed
configuration changes the cache key and asks again.

`StageGuard` stops a run whose stage fails for more than a share of its first calls, with one
line naming the commonest cause: a misconfigured server must not cost a night and exit 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rescue.errors import UserError
from rescue.records import reason_code

RETRYABLE_4XX = frozenset({408, 409, 429})


class TransportError(RuntimeError):
    """A model call that did not get through after the client's retries.

    `status` is the HTTP status when a server answered (None: no answer at all); `partial` holds
    the results that did arrive before the failure (e.g. the other chunks of one plan call), so
    the pipeline keeps them and a resumed run asks only for what was lost.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 partial: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.partial = list(partial)


@dataclass(frozen=True)
class CallFailure:
    error: str  # "<area>:<code> <detail>"
    transient: bool


def classify(exc: TransportError) -> CallFailure:
    """The recorded reason and permanence of a failed call: a 4xx other than 408/409/429 is the
    server refusing this exact request (permanent); anything else may pass on a retry."""
    status = exc.status
    detail = " ".join(str(exc).split())[:500]
    if isinstance(status, int) and 400 <= status < 500 and status not in RETRYABLE_4XX:
        return CallFailure(f"request:rejected HTTP {status} {detail}", transient=False)
    if isinstance(status, int):
        return CallFailure(f"request:unavailable HTTP {status} {detail}", transient=True)
    return CallFailure(f"request:{type(exc).__name__}: {detail}", transient=True)


class RunAborted(UserError, RuntimeError):
    """A stage failed for too large a share of its first calls; the message is one line."""


@dataclass
class StageGuard:
    """Counts each stage's calls and failures; after `min_calls` calls of a stage, a failure
    share above `max_failure_share` raises RunAborted (checked once, at that call)."""

    min_calls: int = 20
    max_failure_share: float = 0.5
    calls: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_calls < 1:
            raise ValueError(f"pipeline.abort.min_calls must be >= 1, got {self.min_calls}")
        if not 0.0 <= self.max_failure_share <= 1.0:
            raise ValueError("pipeline.abort.max_failure_share must be in 0..1, got "
                             f"{self.max_failure_share}")

    def record(self, stage: str, error: str | None, k: int = 1) -> None:
        """`k` calls of `stage` ended, failed with `error` (None: they succeeded)."""
        if k <= 0:
            return
        before = self.calls[stage]
        self.calls[stage] += k
        if error is not None:
            self.failures[stage] += k
            self.reasons.setdefault(stage, Counter())[reason_code(error)] += k
            self.reasons.setdefault(stage + "/example", Counter())[error[:300]] += k
        if before < self.min_calls <= self.calls[stage]:
            share = self.failures[stage] / self.calls[stage]
            if share > self.max_failure_share:
                code = self.reasons[stage].most_common(1)[0][0]
                example = self.reasons[stage + "/example"].most_common(1)[0][0]
                raise RunAborted(
                    f"{stage}: {self.failures[stage]} of the first {self.calls[stage]} calls "
                    f"failed ({share:.0%} > pipeline.abort.max_failure_share="
                    f"{self.max_failure_share:g}), mostly {code}: {example}")

    def shares(self) -> dict[str, float]:
        """Failure share of each stage's calls so far."""
        return {s: self.failures[s] / n for s, n in self.calls.items() if n}
