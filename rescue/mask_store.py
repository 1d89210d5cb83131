"""Masks by digest: read a record's masks back from the record alone.

The execute stage caches each answer under what the executor was asked (model identity and
prompt), so reading a mask back that way needs the models and the prompt rebuilt. A record
names its masks by content (`CandidateRecord.mask_key`, `masks.digest`); the store keeps each
distinct mask once under that digest, in the shared cache, so overlays, inference and the
analysis tools read masks back with no model identity and no prompt.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rescue import masks
from rescue.cache import Cache, make_key
from rescue.records import SampleRecord

STAGE = "mask"


def _key(digest: str) -> str:
    return make_key({"role": "mask", "digest": digest})


class MaskStore:
    """The masks of a cache, by digest. A read-only (offline) cache is read, never written."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def put_many(self, rles: Mapping[str, masks.Rle]) -> None:
        """Keep each digest -> mask of `rles` not kept already, in one cache append
        (content-addressed: a second copy written by a racing process is the same mask)."""
        if self.cache.offline:
            return
        new = [(key, {"digest": d, "rle": dict(rle)}, d) for d, rle in rles.items()
               if not self.cache.has(STAGE, key := _key(d))]
        if new:
            self.cache.put_many(STAGE, new)

    def get(self, digest: str) -> np.ndarray | None:
        """The mask, or None when the store does not hold it."""
        hit = self.cache.get(STAGE, _key(digest))
        return masks.decode(hit["rle"]) if hit is not None else None

    def of(self, record: SampleRecord) -> dict[int, np.ndarray]:
        """Candidate index -> mask, for the candidates of `record` whose mask is kept."""
        decoded: dict[str, np.ndarray | None] = {}
        out: dict[int, np.ndarray] = {}
        for c in record.candidates:
            if c.mask_key is None:
                continue
            if c.mask_key not in decoded:
                decoded[c.mask_key] = self.get(c.mask_key)
            m = decoded[c.mask_key]
            if m is not None:
                out[c.index] = m
        return out
