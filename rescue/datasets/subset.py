"""Which samples a run evaluates: a seeded fraction, a limit, and one shard of the result.

Order of operations: fraction, then limit, then shard.

- fraction: an id is in when a hash of (seed, id) falls below `fraction`. Each id's fate depends
  on that id alone, so adding samples to a dataset never changes whether an old one is in, and
  fraction 0.1 is a subset of fraction 0.2 with the same seed.
- limit: the first `limit` selected ids in the dataset's own (stable) order.
- shard: contiguous chunks of the selected list, sizes differing by at most one (as NeMo-Skills
  splits a benchmark over jobs). Chunks rather than a hash because shards then partition the
  selection exactly with balanced sizes however few samples there are, and neighbouring ids
  (the several expressions of one RefCOCO image) stay in one job, where the executor's image
  embedding cache serves them. Chunk boundaries move when the selection changes, which costs
  nothing: every job of a study shares the content-addressed cache, and the merge step checks
  that the shards it joins came from one selection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _unit(seed: int, sample_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, id)."""
    h = hashlib.sha256(f"{seed}\x00{sample_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of `shard` when n items are cut into `num_shards` contiguous chunks."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


def select_ids(ids: Sequence[str], *, fraction: float | None = None, limit: int | None = None,
               shard: int = 0, num_shards: int = 1, seed: int = 0) -> list[str]:
    """The ids this job evaluates, in the dataset's order."""
    if fraction is not None and not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"subset.fraction must be in (0, 1], got {fraction}")
    if limit is not None and int(limit) < 0:
        raise ValueError(f"subset.limit must be >= 0, got {limit}")
    if int(num_shards) < 1:
        raise ValueError(f"subset.num_shards must be >= 1, got {num_shards}")
    if not 0 <= int(shard) < int(num_shards):
        raise ValueError(f"subset.shard must be in [0, {num_shards}), got {shard}")
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    chosen = list(ids)
    if fraction is not None and float(fraction) < 1.0:
        chosen = [i for i in chosen if _unit(int(seed), i) < float(fraction)]
    if limit is not None:
        chosen = chosen[: int(limit)]
    start, stop = shard_bounds(len(chosen), int(shard), int(num_shards))
    return chosen[start:stop]
