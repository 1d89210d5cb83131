"""The preflight probe: one real request with a run's exact payload, before any sample.

`/v1/models` says a server is up and serves the model; only a request says whether it accepts
what the run will send. A `top_logprobs` above the server's `--max-logprobs`, more images than
its `--limit-mm-per-prompt`, a `response_format` it cannot honour or a `max_tokens` that leaves
no room for the prompt would otherwise make every call of the run a 400. The probe sends the
payload the run sends, with `max_tokens=1` so it costs one prefill, and checks the prompt's
token count from `usage` plus the configured `max_tokens` against `max_model_len` from
`/v1/models`. Each problem is one line naming the setting to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("logprobs",), "lower {role}.top_logprobs to the server's limit, or restart vLLM with "
                    "--max-logprobs {top_logprobs}"),
    (("image(s) may be provided", "limit-mm-per-prompt"),
     "the request holds {images} image(s): restart vLLM with --limit-mm-per-prompt "
     "'{{\"image\": {images}}}' or send fewer views"),
    (("maximum context length", "max_model_len", "too large"),
     "lower {role}.sampling.max_tokens, or restart vLLM with a larger --max-model-len"),
    (("response_format", "json_schema", "structured", "guided", "grammar", "xgrammar"),
     "this server cannot honour the structured output: set {role}.structured_output=false or "
     "serve with a structured-outputs backend"),
    (("uuid",), "this server takes no image uuids: set {role}.continuation_images=resend"),
)


def count_images(messages: Any) -> int:
    """Images in chat messages (what vLLM compares with --limit-mm-per-prompt)."""
    n = 0
    for m in messages or []:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, Mapping)
                     and part.get("type") == "image_url")
    return n


def rejection(status: int | None, message: str, *, role: str, payload: Mapping[str, Any]) -> str:
    """One line for a probe the server refused: its own words, then the setting to change."""
    fields = {"role": role, "top_logprobs": payload.get("top_logprobs"),
              "images": count_images(payload.get("messages"))}
    low = message.lower()
    hint = next((h.format(**fields) for keys, h in _HINTS if any(k in low for k in keys)),
                "the run would get this answer on every call")
    said = " ".join(message.split())[:240]
    return f"the server refused the run's request (HTTP {status}: {said}); {hint}"


def context_problem(prompt_tokens: int | None, max_tokens: int, max_model_len: int | None, *,
                    role: str, images: int) -> str | None:
    """The prompt plus `max_tokens` must fit in the server's context; None when it does."""
    if prompt_tokens is None or max_model_len is None:
        return None
    if prompt_tokens + max_tokens <= max_model_len:
        return None
    room = max_model_len - prompt_tokens
    return (f"the prompt ({prompt_tokens} tokens with {images} image(s) of the first sample) "
            f"plus {role}.sampling.max_tokens={max_tokens} exceeds the server's max_model_len="
            f"{max_model_len}: lower max_tokens to at most {max(room, 0)} or restart vLLM with "
            f"--max-model-len >= {prompt_tokens + max_tokens}")


def max_model_len(entry: Mapping[str, Any] | None) -> int | None:
    """vLLM's `/v1/models` entry carries `max_model_len`; other servers may not."""
    value = (entry or {}).get("max_model_len")
    return int(value) if isinstance(value, int | float) and value > 0 else None
