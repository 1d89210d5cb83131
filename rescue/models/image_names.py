"""Images named by uuid: a two-step verdict's continuation names its images instead of sending
them again (`verifier.continuation_images`).

vLLM (>= 0.11) keys an image part's processed form by the part's `uuid` where the request gives
one, and a later part `{"type": "image_url", "image_url": null, "uuid": ...}` is served from its
multimodal processor cache: the continuation's body then carries no image bytes, and the server
neither decodes nor processes them a second time. A uuid is a hash of the image's data URL,
prefixed `rescue-`, so it names those bytes only, whoever sends them.

The server may not hold an image (vLLM 0.32 answers 400 "Cache miss for image at index i but data
is not provided." after an eviction, or where several API-server processes each keep their own
cache), or may take no uuids at all (no processor cache: `--mm-processor-cache-gb 0`; not vLLM).
The refused request is then sent again with its images, and `ImageNames` decides whether naming
goes on: a refusal that is no cache miss turns it off for the run, and so do cache misses that
are most of the tries (several API-server processes). Either way the model reads the same
prompt, so no cache key depends on any of this.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from rescue.models.http import EndpointError

CONTINUATION_IMAGES = ("uuid", "resend")
MISSES_CHECKED_AFTER = 16
"""Continuations by uuid tried before a miss rate above one half turns naming off."""

log = logging.getLogger(__name__)


def media_uuid(url: str) -> str:
    """The uuid of an image given by its data URL: a hash of the URL's bytes."""
    return "rescue-" + hashlib.sha256(url.encode()).hexdigest()[:32]


def named_images(messages: list[dict[str, Any]],
                 uuids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`messages` with a `uuid` on every image part given by a data URL (an http URL names
    whatever it serves at the time: left unnamed): the i-th such part gets `uuids[i]` where
    given (the views' uuids, hashed in the verifier's pool as they were drawn), else the
    `media_uuid` of its URL."""
    given = iter(uuids)

    def name(part: dict[str, Any]) -> dict[str, Any]:
        url = part["image_url"]["url"]
        if not url.startswith("data:"):
            return part
        return {**part, "uuid": next(given, None) or media_uuid(url)}

    return [_map_images(m, name) for m in messages]


def images_by_uuid(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`named_images` messages with every named image part reduced to its uuid."""
    def by_uuid(part: dict[str, Any]) -> dict[str, Any]:
        if "uuid" not in part:
            return part
        return {"type": "image_url", "image_url": None, "uuid": part["uuid"]}

    return [_map_images(m, by_uuid) for m in messages]


def _map_images(message: dict[str, Any], f: Callable[[dict[str, Any]], dict[str, Any]]
                ) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": [f(p) if isinstance(p, dict) and p.get("type") == "image_url"
                                   else p for p in content]}


def refused(exc: EndpointError) -> bool:
    """A permanent 4xx: the server refuses this body (not overloaded, not a timeout, which are
    retried and say nothing about uuids)."""
    return not exc.retryable and exc.status is not None and 400 <= exc.status < 500


class ImageNames:
    """One verifier's naming of images: on for `mode` "uuid" until the server shows it takes
    no uuids, with counts of the requests sent again."""

    def __init__(self, mode: str, server: str):
        if mode not in CONTINUATION_IMAGES:
            raise ValueError(f"verifier.continuation_images must be one of "
                             f"{CONTINUATION_IMAGES}, got {mode!r}")
        self.mode = mode
        self.server = server
        self.on = mode == "uuid"
        self.tries = 0  # continuations sent by uuid
        self.resent: Counter[str] = Counter()

    def sent_again(self, exc: EndpointError, where: str) -> None:
        """A request refused with named images (`where`: "request" or "continuation") went
        through without them: count it, and stop naming where the server takes no uuids."""
        miss = where == "continuation" and "cache miss" in str(exc).lower()
        self.resent[f"{where}_{'cache_miss' if miss else 'refused'}"] += 1
        if not self.on:
            return
        misses = self.resent["continuation_cache_miss"]
        if not miss:
            why = f"it refused a {where} naming its images by uuid ({exc})"
        elif self.tries >= MISSES_CHECKED_AFTER and 2 * misses > self.tries:
            why = (f"{misses} of {self.tries} continuations by uuid missed its processor cache "
                   f"(several API-server processes each keep their own)")
        else:
            return
        self.on = False
        log.warning("verifier: %s: %s; images are sent again from now on "
                    "(verifier.continuation_images=resend skips the try)", self.server, why)

    def stats(self) -> dict[str, Any]:
        """Empty while nothing was sent again."""
        if not self.resent:
            return {}
        return {"images_by_uuid": {"on": self.on, "continuations": self.tries,
                                   "sent_again": dict(self.resent)}}
