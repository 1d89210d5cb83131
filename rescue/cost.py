"""What a model answer cost: tokens, calls, executor work and time, as cached with the answer.

Every cached answer (a `Hypothesis`, `Segmentation` or `Verdict`) carries its `Cost` in
`meta["cost"]`, so a study re-costs offline: the expected cost at every N (`rescue.expected_cost`)
and the user's conversion to GPU-seconds (`CostRates`) are computed from the cache, never from a
model. A call shared by several answers is counted once: a planner request with `n > 1` puts its
prompt tokens, its call and its latency on its first child and each child's own completion tokens
on that child; an executor call puts its call, image encode and timing on its first prompt. Sums
over cache entries are therefore the totals of the calls made, with no double count.

Units: tokens as the server's `usage` reports them (`reasoning_tokens` is a part of
`completion_tokens`, as in vLLM); seconds for `latency_s` (wall time of the request, client side)
and `server_s` (the server's own timing, where it reports one). A simulated model's cost is
plausible, not measured, and says so (`simulated`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

STAGE_MODELS = {"plan": "planner", "execute": "executor", "verify": "verifier"}
"""The model role that does each stage's work (the keys of `CostRates`)."""


@dataclass(frozen=True)
class Cost:
    """One answer's share of what its call cost (see the module doc for who carries what)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    calls: int = 0
    prompts: int = 0  # executor prompts run
    encodes: int = 0  # executor image encodes (0 when the server's embedding cache served it)
    latency_s: float = 0.0
    server_s: float = 0.0
    simulated: bool = False
    estimated: bool = False  # completion tokens apportioned from a total (no per-child count)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Cost) -> Cost:
        # seconds kept to the microsecond, as stored: a sum is then the same in any order
        kw: dict[str, Any] = {k: getattr(self, k) + getattr(other, k) for k in _INTS}
        for k in _FLOATS:
            kw[k] = round(getattr(self, k) + getattr(other, k), 6)
        return Cost(**kw, simulated=self.simulated or other.simulated,
                    estimated=self.estimated or other.estimated)

    def to_json(self) -> dict[str, Any]:
        """Only what is set, so an answer's meta stays short."""
        out: dict[str, Any] = {}
        for k in _FIELDS:
            v = getattr(self, k)
            if v:
                out[k] = round(v, 6) if isinstance(v, float) else v
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Cost:
        if not d:
            return cls()
        known = _COST_FIELDS
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in known and v is not None:
                kind = known[k]
                kw[k] = bool(v) if kind == "bool" else int(v) if kind == "int" else float(v)
        return cls(**kw)

    @classmethod
    def of(cls, meta: Mapping[str, Any] | None) -> Cost:
        """The cost in an answer's meta (nothing recorded: zero)."""
        return cls.from_json((meta or {}).get("cost"))


_COST_FIELDS = {f.name: f.type for f in fields(Cost)}
"""`Cost`'s field names and types, read once (a study reads thousands of costs, and a run adds
one up per answer)."""
_FIELDS = tuple(_COST_FIELDS)
_INTS = tuple(k for k, t in _COST_FIELDS.items() if t == "int")
_FLOATS = tuple(k for k, t in _COST_FIELDS.items() if t == "float")


def total(costs: Sequence[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(value: Any) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0
    return int(v) if math.isfinite(v) and v > 0 else 0


@dataclass(frozen=True)
class Usage:
    """A response's `usage`: prompt tokens once, completion (reasoning included) over all
    choices, and the reasoning part where a reasoning parser reports it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def of(cls, response: Any) -> Usage:
        """From an OpenAI SDK response object or its JSON (either works: attribute or key)."""
        usage = _get(response, "usage")
        details = _get(usage, "completion_tokens_details")
        return cls(_count(_get(usage, "prompt_tokens")), _count(_get(usage, "completion_tokens")),
                   _count(_get(details, "reasoning_tokens")))


def choice_tokens(choice: Any) -> int | None:
    """A choice's own completion tokens where it counts them (one logprobs entry a token)."""
    content = _get(_get(choice, "logprobs"), "content")
    return len(content) if content else None


def choice_chars(choice: Any) -> int:
    """Characters a choice generated (answer and reasoning): the weights of an apportioned
    total when the choices' own token counts are unknown."""
    msg = _get(choice, "message")
    return sum(len(_get(msg, k) or "") for k in ("content", "reasoning", "reasoning_content"))


def split(total_count: int, weights: Sequence[float]) -> list[int]:
    """`total_count` apportioned to `weights` by largest remainder: integers summing exactly to
    it (equal shares where every weight is 0)."""
    if not weights:
        return []
    w = [max(0.0, float(x)) for x in weights]
    s = sum(w)
    if s <= 0:
        w, s = [1.0] * len(w), float(len(w))
    exact = [total_count * x / s for x in w]
    out = [math.floor(x) for x in exact]
    rest = total_count - sum(out)
    for k in sorted(range(len(w)), key=lambda k: (out[k] - exact[k], k))[:rest]:
        out[k] += 1
    return out


def request_costs(usage: Usage, child_tokens: Sequence[int | None], child_chars: Sequence[int],
                  latency_s: float) -> list[Cost]:
    """Per child of one chat request: the prompt, the call and the latency on child 0; each
    child's own completion tokens where counted (its logprobs), else the response's completion
    total apportioned by the children's text length (`estimated`). Reasoning tokens, reported
    only as a total, are apportioned the same way. The children's sums equal `usage`."""
    k = len(child_chars)
    if k == 0:
        return []
    counted = all(t is not None for t in child_tokens) and len(child_tokens) == k
    if counted and sum(int(t or 0) for t in child_tokens) == usage.completion_tokens:
        completion = [int(t or 0) for t in child_tokens]
    else:
        counted = False
        completion = split(usage.completion_tokens, [float(c) + 1 for c in child_chars])
    reasoning = split(usage.reasoning_tokens, completion)
    out = []
    for i in range(k):
        out.append(Cost(prompt_tokens=usage.prompt_tokens if i == 0 else 0,
                        completion_tokens=completion[i], reasoning_tokens=reasoning[i],
                        calls=1 if i == 0 else 0, latency_s=latency_s if i == 0 else 0.0,
                        estimated=not counted and k > 1))
    return out


def with_cost(meta: Mapping[str, Any], cost: Cost) -> dict[str, Any]:
    """`meta` with `cost` recorded (an answer's meta is where its cost is cached)."""
    return {**meta, "cost": cost.to_json()}


# -- simulated costs: plausible, deterministic, marked ---------------------------------------

def image_tokens(width: int, height: int, patch: int = 32) -> int:
    """Visual tokens of a Qwen3-VL-like encoder (16 px patches merged 2 × 2)."""
    return max(1, math.ceil(width / patch)) * max(1, math.ceil(height / patch))


def text_tokens(text: str) -> int:
    """About four characters a token, as BPE vocabularies give for English."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def simulated_chat(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0,
                   *, first: bool = True) -> Cost:
    """A simulated chat answer's cost: its tokens, and a latency a 30 token/s decode and a
    5000 token/s prefill would take (not measured: `simulated`)."""
    latency = completion_tokens / 30.0 + (prompt_tokens / 5000.0 if first else 0.0)
    return Cost(prompt_tokens=prompt_tokens if first else 0, completion_tokens=completion_tokens,
                reasoning_tokens=reasoning_tokens, calls=1 if first else 0,
                latency_s=round(latency, 6), simulated=True)


# -- the user's conversion to GPU-seconds ----------------------------------------------------

@dataclass(frozen=True)
class ModelRates:
    """GPU-seconds one model spends per token, per call, per executor prompt and per image
    encode (a benchmark calibrates them on the user's cluster); None: not converted."""

    gpu_s_per_token: float | None = None
    gpu_s_per_call: float | None = None
    gpu_s_per_prompt: float | None = None
    gpu_s_per_encode: float | None = None

    @property
    def set(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, role: str) -> ModelRates:
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"cost.{role}: unknown keys {unknown}; valid: "
                             f"{', '.join(f.name for f in fields(cls))}")
        kw = {}
        for k, v in cfg.items():
            if v is None:
                continue
            x = float(v)
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"cost.{role}.{k} must be a finite number >= 0, got {v!r}")
            kw[k] = x
        return cls(**kw)


@dataclass(frozen=True)
class CostRates:
    """GPU-seconds per unit of each model's work (config `cost.{planner,executor,verifier}`)."""

    planner: ModelRates = ModelRates()
    executor: ModelRates = ModelRates()
    verifier: ModelRates = ModelRates()

    @property
    def set(self) -> bool:
        return self.planner.set or self.executor.set or self.verifier.set

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CostRates:
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(STAGE_MODELS.values()))
        if unknown:
            raise ValueError(f"cost: unknown keys {unknown}; valid: planner, executor, verifier")
        return cls(**{role: ModelRates.from_config(cfg.get(role), role)
                      for role in STAGE_MODELS.values()})

    def to_json(self) -> dict[str, Any]:
        return {role: {k: v for k, v in asdict(getattr(self, role)).items() if v is not None}
                for role in STAGE_MODELS.values()}
