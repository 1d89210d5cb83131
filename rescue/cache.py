"""The content-addressed cache of every model call: where hypotheses, masks and verdicts live.

Each entry is keyed by a hash of everything that can change the answer (DESIGN §3) and stored
as one JSON line appended to a segment file owned by the writing process:

    <root>/<stage>/<writer>.jsonl      {"k": <key>, "v": <value>, "what": <description>}

Why segments: one O_APPEND write per entry is atomic for practical purposes, a killed writer can
only tear its own last line (skipped on read), and several processes (a Hydra multirun, SLURM
array jobs) share one directory without locks because no two write the same file. Readers pick
up entries other processes append while they run by tailing segments on a miss. Many small
entries live in few files, which network file systems prefer to one file per mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("plan", "execute", "verify")


class CacheMiss(LookupError):
    """Raised in offline mode: the answer is not cached and no model may be called."""

    def __init__(self, stage: str, what: str, key: str) -> None:
        super().__init__(f"offline=true but the {stage} cache has no entry for {what} "
                         f"(key {key[:16]}…). Run once without offline=true to compute it.")
        self.stage, self.what, self.key = stage, what, key


def make_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `fields` (sorted keys, no whitespace)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _Segments:
    """In-memory index of one stage, fed incrementally from its segment files."""

    entries: dict[str, Any] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    last_scan: float = 0.0


class Cache:
    """A shared, append-only store of stage results.

    `offline=True` turns every miss into `CacheMiss`. Counters of hits, misses and writes per
    stage make every call countable (`stats()`).
    """

    def __init__(self, root: str | Path, *, offline: bool = False,
                 rescan_interval: float = 1.0) -> None:
        self.root = Path(root)
        self.offline = offline
        self.rescan_interval = rescan_interval
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stages: dict[str, _Segments] = {}
        self.counts: Counter[str] = Counter()

    # -- reading -----------------------------------------------------------------------------
    def _scan(self, stage: str) -> _Segments:
        seg = self._stages.setdefault(stage, _Segments())
        folder = self.root / stage
        if folder.is_dir():
            for path in sorted(folder.glob("*.jsonl")):
                name = path.name
                start = seg.offsets.get(name, 0)
                size = path.stat().st_size
                if size <= start:
                    continue
                with open(path, "rb") as f:
                    f.seek(start)
                    chunk = f.read(size - start)
                end = chunk.rfind(b"\n") + 1  # only whole lines; a torn tail is left for later
                for line in chunk[:end].splitlines():
                    try:
                        item = json.loads(line)
                        seg.entries[item["k"]] = item["v"]
                    except (ValueError, KeyError):
                        continue  # a line torn by a crash in the middle of a file: skip it
                seg.offsets[name] = start + end
        seg.last_scan = time.monotonic()
        return seg

    def _segments(self, stage: str) -> _Segments:
        seg = self._stages.get(stage)
        return seg if seg is not None else self._scan(stage)

    def get(self, stage: str, key: str) -> Any | None:
        seg = self._segments(stage)
        if key not in seg.entries and time.monotonic() - seg.last_scan > self.rescan_interval:
            seg = self._scan(stage)  # another process may have written it meanwhile
        value = seg.entries.get(key)
        self.counts[f"{stage}.{'hit' if value is not None else 'miss'}"] += 1
        return value

    def require(self, stage: str, key: str, what: str) -> Any | None:
        """Cached value, None on a miss; in offline mode a miss raises `CacheMiss`."""
        value = self.get(stage, key)
        if value is None and self.offline:
            raise CacheMiss(stage, what, key)
        return value

    def __len__(self) -> int:
        return sum(len(self._segments(s).entries) for s in STAGES)

    # -- writing -----------------------------------------------------------------------------
    def put(self, stage: str, key: str, value: Any, what: str = "") -> None:
        if self.offline:
            raise RuntimeError("offline cache is read-only")
        line = json.dumps({"k": key, "v": value, "what": what}, separators=(",", ":"),
                          allow_nan=False) + "\n"
        folder = self.root / stage
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{self.writer}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        self._segments(stage).entries[key] = value
        self.counts[f"{stage}.write"] += 1

    def stats(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def disk_usage(self, stage: str) -> tuple[int, int]:
        """(bytes on disk, entries) of a stage, e.g. to report cache bytes per mask."""
        folder = self.root / stage
        size = sum(p.stat().st_size for p in folder.glob("*.jsonl")) if folder.is_dir() else 0
        return size, len(self._scan(stage).entries)
