"""Per-sample records: everything evaluation needs, so every N and selector is computed offline.

A record keeps, per candidate, the scores every selector reads and the intersection and union
pixel counts (not only IoU) so cIoU can be recomputed for any subset. Records are written one
JSON line per sample as samples finish (crash-safe append), then sorted into `records.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_CODE = re.compile(r"^[A-Za-z_]+:[A-Za-z_]+")


def reason_code(error: str | None) -> str:
    """The stable head of a failure reason, for grouping failures in tables.

    Errors are written "<area>:<code> <detail>" ("parse:truncated no complete object",
    "request:ConnectError: ..."); the code is the first token. Foreign messages without a code
    ("TimeoutError: after 30 s") are cut at their first ": ".
    """
    text = (error or "").strip()
    m = _CODE.match(text)
    if m:
        return m.group(0)
    head = text.split(": ", 1)[0].strip().rstrip(":")
    return " ".join(head.split())[:80] or "unknown"


@dataclass
class CandidateRecord:
    """Hypothesis `index` of a sample after plan, execute and verify.

    A candidate without a mask (failed at plan or execute) is scored as an empty prediction
    (intersection 0, union = target area) and no selector prefers it over one with a mask.
    """

    index: int
    failed_stage: str | None = None  # "plan" | "execute" | "verify" | None
    error: str | None = None
    text: str | None = None
    box: list[float] | None = None
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    prompt_key: str | None = None
    mask_key: str | None = None
    duplicate_of: int | None = None  # first index with the same mask (verified once)
    area: int = 0
    executor_score: float | None = None
    verifier_score: float | None = None
    verifier_source: str | None = None
    consensus: float | None = None  # mean IoU with the pool's other working candidates
    intersection: int = 0
    union: int = 0
    iou: float = 0.0
    # what this candidate's calls cost, per stage ("plan", "execute", "verify": `Cost.to_json`);
    # a call shared under dedupe sits on the first candidate of its group only
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The candidate has a mask. A failed verification leaves the mask usable by every
        selector but the verifier's, which ranks it below every scored candidate."""
        return self.failed_stage not in ("plan", "execute")


@dataclass
class SampleRecord:
    sample_id: str
    dataset: str
    query: str
    height: int
    width: int
    target_area: int
    simulated: bool
    candidates: list[CandidateRecord] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    error: str | None = None  # the whole sample failed (e.g. corrupt image): no candidates
    # the distinct masks (digests, in order of first appearance) and their pairwise IoU, so
    # consensus within any subset of candidates can be evaluated offline (rescue/consensus.py)
    masks: list[str] = field(default_factory=list)
    mask_iou: list[list[float]] = field(default_factory=list)
    # a pairwise verifier's answers (rescue/arena.py): [i, j, P(mask i better than mask j, i
    # shown first), the call's cost (`Cost.to_json`)] over positions in `masks`; only a
    # pairwise run has any (records of older versions: no cost)
    comparisons: list[list[Any]] = field(default_factory=list)
    # a listwise verifier's answers (rescue/listwise.py): [mask positions shown, position
    # chosen or None, the call's cost]; only a listwise run has any
    choices: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Every field; `comparisons` and `choices` only where there are some (other records
        read alike)."""
        d = asdict(self)
        for name in ("comparisons", "choices"):
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SampleRecord:
        """Fields this version does not know (records of a newer one) are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        cand_fields = CandidateRecord.__dataclass_fields__
        known["candidates"] = [CandidateRecord(**{k: v for k, v in c.items() if k in cand_fields})
                               for c in d.get("candidates", [])]
        return cls(**known)


def json_safe(obj: Any, *, nonfinite: Callable[[float], Any] | None = None,
              text: Callable[[str], str] | None = None) -> Any:
    """`obj` as standard JSON values, the one sanitiser of every JSON file and reply written.

    JSON has no NaN/inf: they become null (or `nonfinite(value)`), so every line is standard
    JSON. Numpy scalars and arrays become Python numbers and lists; `text`, where given, maps
    every string (keys too), e.g. to replace what a strict encoder refuses.
    """
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if nonfinite is None else nonfinite(obj)
    if isinstance(obj, str):
        return obj if text is None else text(obj)
    if isinstance(obj, Mapping):
        return {json_safe(k, nonfinite=nonfinite, text=text):
                json_safe(v, nonfinite=nonfinite, text=text) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v, nonfinite=nonfinite, text=text) for v in obj]
    return obj


def dumps(record: SampleRecord) -> str:
    return json.dumps(json_safe(record.to_json()), separators=(",", ":"), sort_keys=True)


def append(path: Path, record: SampleRecord) -> None:
    """Append one record as one write of one line, flushed to disk."""
    line = (dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> Iterator[SampleRecord]:
    """Records of a JSONL file; a torn last line (killed writer) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            yield SampleRecord.from_json(json.loads(line))


def write(path: Path, records: Iterable[SampleRecord]) -> None:
    """Write records sorted by sample id, atomically (tmp file + rename)."""
    recs = sorted(records, key=lambda r: r.sample_id)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(dumps(r) + "\n")
    os.replace(tmp, path)
