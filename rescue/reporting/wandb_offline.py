"""Read an offline W&B run (`offline-run-*/run-*.wandb`) without uploading it.

Offline runs write no `wandb-summary.json` or `config.yaml`: everything is in the `.wandb`
transaction log, a LevelDB-style log of protobuf `Record`s (32 KiB blocks, 7-byte chunk
headers, after a 7-byte file header ":W&B" + magic + version). This reads it with wandb's own
protobuf classes so tests and analysis can check what a run logged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    exited: bool = False


def log_file(path: Path | str) -> Path:
    """The `.wandb` file of a run directory (or the file itself)."""
    p = Path(path)
    if p.is_file():
        return p
    found = sorted(p.glob("*.wandb"))
    if not found:
        raise FileNotFoundError(f"no .wandb file in {p}")
    return found[0]


def raw_records(path: Path | str) -> Iterator[bytes]:
    """The serialized records of a `.wandb` file, reassembled from their chunks."""
    data = log_file(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer too small for a header: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:
            pos += (BLOCK - pos % BLOCK) % BLOCK
            continue
        if pos + length > len(data):  # torn tail: the writer is still at work
            return
        chunk = data[pos:pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _set(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    value = json.loads(item.value_json) if item.value_json else None
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def read_run(path: Path | str) -> OfflineRun:
    """Config, summary, history rows, tags and files of an offline run directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun()
    for raw in raw_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project = r.run_id or run.run_id, r.project or run.project
            run.name, run.group = r.display_name or run.name, r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            if r.tags:
                run.tags = list(r.tags)
            for item in r.config.update:
                _set(run.config, item)
        elif kind == "config":
            for item in rec.config.update:
                _set(run.config, item)
        elif kind == "summary":
            for item in rec.summary.update:
                _set(run.summary, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set(row, item)
            run.history.append(row)
        elif kind == "files":
            run.files += [f.path for f in rec.files.files]
        elif kind == "exit":
            run.exited = True
    return run


def has_exited(path: Path | str) -> bool:
    """Whether the run's log already holds its exit record (the writer may lag `finish()`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for raw in raw_records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "exit":
                return True
    except (OSError, ValueError):
        return False
    return False
