"""Running one image's prompts in as few forward passes as a model allows (both SAM3 backends).

Prompts that can share a forward pass (the same `key`: same head, same tensor shapes) run as
one batched call, in chunks of at most `max_batch`; results come back in the prompts' order.
A batched call that raises anything but out-of-memory falls back to the per-prompt path for
that chunk, so one bad prompt fails only itself, as it did when every prompt ran alone.
Out-of-memory still raises: the request fails (500) and `max_batch` is the memory knob.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, ROCm, MPS) says so in its message."""
    return "out of memory" in str(exc).lower()


def chunks(items: Sequence[T], key: Callable[[T], Hashable], max_batch: int
           ) -> list[list[int]]:
    """Indices of `items` grouped by `key` (groups in order of first appearance, indices in
    order within a group), each group cut into runs of at most `max_batch`."""
    if max_batch < 1:
        raise ValueError("max_batch is at least 1")
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return [idx[s:s + max_batch] for idx in groups.values()
            for s in range(0, len(idx), max_batch)]


def run_batched(items: Sequence[T], key: Callable[[T], Hashable], max_batch: int,
                batch: Callable[[list[T]], list[R]], one: Callable[[T], R]) -> list[R]:
    """`batch` over each chunk of same-key items (one result per item, in order); `one` item
    by item for a chunk of a single item, or where `batch` raised a non-OOM error. `one` turns
    its own failures into results."""
    out: list[R | None] = [None] * len(items)
    for idx in chunks(items, key, max_batch):
        group = [items[i] for i in idx]
        results: list[R] | None = None
        if len(group) > 1:
            try:
                results = batch(group)
                if len(results) != len(group):
                    raise RuntimeError(f"{len(results)} results for {len(group)} prompts")
            except Exception as exc:
                if is_oom(exc):
                    raise
                log.warning("a batch of %d prompts failed (%s: %s); running them one by one",
                            len(group), type(exc).__name__, exc)
                results = None
        if results is None:
            results = [one(item) for item in group]
        for i, r in zip(idx, results, strict=True):
            out[i] = r
    return out  # type: ignore[return-value]
