"""Segmentation backends of the SAM server, chosen by name; heavy imports happen in `load()`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from servers.backends.base import (
    BackendInfo,
    Instance,
    PromptResult,
    SegmenterBackend,
    SegmentOptions,
)

BACKENDS = {
    "classical": "servers.backends.classical:ClassicalBackend",
    "sam3": "servers.backends.sam3_meta:Sam3MetaBackend",
    "hf": "servers.backends.sam3_hf:Sam3HFBackend",
}


def make_backend(spec: str, options: Mapping[str, Any] | None = None) -> SegmenterBackend:
    """Build the backend `spec` names: a key of BACKENDS or 'package.module:factory'.

    The dotted form lets a deployment (or a test stand-in under tests/) plug in its own backend
    without touching this package. `options` are the factory's keyword arguments.
    """
    target = BACKENDS.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown backend {spec!r}: one of {sorted(BACKENDS)} or "
                         f"'package.module:factory'")
    module_name, attr = target.split(":", 1)
    factory = getattr(importlib.import_module(module_name), attr)
    backend = factory(**dict(options or {}))
    if not isinstance(backend, SegmenterBackend):
        raise TypeError(f"{target} did not build a SegmenterBackend (got {type(backend).__name__})")
    return backend


__all__ = ["BACKENDS", "BackendInfo", "Instance", "PromptResult", "SegmentOptions",
           "SegmenterBackend", "make_backend"]
