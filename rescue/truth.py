"""A run's ground truth and candidate masks, kept beside its records (`masks.jsonl`).

Records hold every count the selectors need; what produces a *new* mask from a pool (an
aggregator: cluster vote, fusion, the union of accepted masks) needs the pixels themselves and
the truth to score what it made. A run keeps both in its directory, one JSON line per sample:
the ground truth as RLE with its ignore region, and each distinct candidate mask by digest, so
`mode=evaluate` on a copied run directory needs neither the dataset nor the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rescue import masks
from rescue.records import json_safe
from rescue.sample import Sample


@dataclass(frozen=True)
class SampleTruth:
    """One sample's truth (`target`: pixels to find, `ignore`: pixels counted in neither
    intersection nor union; None when the sample has none) and its distinct masks by digest."""

    sample_id: str
    target: masks.Rle
    ignore: masks.Rle | None = None
    masks: Mapping[str, masks.Rle] = field(default_factory=dict)

    @classmethod
    def of(cls, sample: Sample, rles: Mapping[str, masks.Rle]) -> SampleTruth:
        ignore = sample.ignore
        return cls(sample.sample_id, masks.encode(sample.target),
                   masks.encode(ignore) if ignore.any() else None, dict(rles))

    def target_mask(self) -> np.ndarray:
        return masks.decode(self.target)

    def ignore_mask(self) -> np.ndarray:
        t = self.target_mask()
        return np.zeros(t.shape, bool) if self.ignore is None else masks.decode(self.ignore)

    def to_json(self) -> dict[str, Any]:
        return {"sample_id": self.sample_id, "target": dict(self.target),
                "ignore": None if self.ignore is None else dict(self.ignore),
                "masks": {d: dict(r) for d, r in self.masks.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SampleTruth:
        return cls(str(d["sample_id"]), dict(d["target"]),
                   None if d.get("ignore") is None else dict(d["ignore"]),
                   {str(k): dict(v) for k, v in (d.get("masks") or {}).items()})


def write(path: Path, items: Iterable[SampleTruth]) -> None:
    """Sorted by sample id, atomically (tmp file + rename), like records.jsonl."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in sorted(items, key=lambda t: t.sample_id):
            f.write(json.dumps(json_safe(t.to_json()), separators=(",", ":"), sort_keys=True)
                    + "\n")
    os.replace(tmp, path)


def read(path: Path) -> Iterator[SampleTruth]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield SampleTruth.from_json(json.loads(line))


def load(path: Path) -> dict[str, SampleTruth]:
    """Sample id -> its truth and masks; a missing file is a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: aggregators need the run's stored truth and masks (a run writes "
            "masks.jsonl beside records.jsonl since issue 13; rerun it, its answers are cached)")
    return {t.sample_id: t for t in read(path)}
