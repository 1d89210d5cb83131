"""The content-addressed cache of every model call: where hypotheses, masks and verdicts live.

Each entry is keyed by a hash of everything that can change the answer and stored
as one JSON line appended to a segment file owned by the writing process:

    <root>/<stage>/<writer>.jsonl      {"k": <key>, "v": <value>, "what": <description>}
    <root>/<stage>/claims              <key> <writer>.jsonl <offset> <length>   (writers' log)

Why segments: one O_APPEND write per model request (all its answers) is atomic for practical
purposes, a killed writer can only tear its own last lines (skipped on read), and several
processes (a Hydra multirun, SLURM array jobs) share one directory because no two write the
same file. Readers pick up entries other processes append while they run by tailing segments
on a miss; readers never lock. A write takes the stage's lock for one check-and-append, so the
first answer stored for a key is the only one, and the one its writer goes on with (`put`
returns it). Many small entries live in few files, which network file systems prefer to one
file per mask.

Memory holds an index, not the values: key -> (segment, offset, length), about 100 bytes an
entry, so a job of a large sweep can open a cache of millions of entries (verdicts carry a
thinking model's reasoning) and read back only the ones it needs, one `pread` each.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from rescue.errors import UserError

STAGES = ("plan", "execute", "verify")
CLAIMS = "claims"  # per stage: "<key> <segment> <offset> <length>" per stored key
log = logging.getLogger("rescue")


class CacheMiss(UserError, LookupError):
    """Raised in offline mode: the answer is not cached and no model may be called."""

    def __init__(self, stage: str, what: str, key: str) -> None:
        super().__init__(f"offline=true but the {stage} cache has no entry for {what} "
                         f"(key {key[:16]}…). Run once without offline=true to compute it.")
        self.stage, self.what, self.key = stage, what, key


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)
"""`json.dumps` with these options builds an encoder per call, most of a short value's cost; a
study makes a few hundred keys a sample."""


def canonical_json(value: Any) -> str:
    """The JSON a key hashes: sorted keys, no whitespace, anything else as its str."""
    return _CANONICAL.encode(value)


@dataclass(frozen=True)
class Canonical:
    """A value already in `canonical_json`, for a part every key of a run repeats (a model's
    identity: its prompts and sampling, a few kB): serialised once, not once a key."""

    json: str

    @classmethod
    def of(cls, value: Any) -> Canonical:
        return cls(canonical_json(value))


def make_key(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `fields` (sorted keys, no whitespace). A `Canonical`
    value is spliced in as it is: the blob, and so the key, is the same as for its value."""
    if not all(isinstance(k, str) for k in fields):
        raise TypeError(f"cache key fields are named by strings, got {sorted(map(repr, fields))}")
    enc = _CANONICAL.encode
    parts = [f"{enc(k)}:{v.json if isinstance(v, Canonical) else enc(v)}"
             for k, v in sorted(fields.items())]
    return hashlib.sha256(("{" + ",".join(parts) + "}").encode()).hexdigest()


_KEY_PREFIX = b'{"k":"'
_KEY_END = len(_KEY_PREFIX) + 64


def _append(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (opened O_APPEND): one system call unless the kernel takes
    only part of it (a full disk, a huge batch), then the rest follows."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _line(entry: Mapping[str, Any]) -> bytes:
    """A segment line: compact JSON, UTF-8, NaN and inf as null (values come normalised so,
    `pipeline._storable`: a writer goes on with what its readers get). What orjson cannot
    write (a lone surrogate in a model's text, an integer past 64 bits) the standard library
    writes, escaped."""
    try:
        return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:  # escaped lone surrogates, integers past 64 bits
        return json.loads(line)


def _key_of(line: bytes) -> str | None:
    """The key of a segment line without parsing its value (lines start {"k":"<64 hex>")."""
    if line.startswith(_KEY_PREFIX) and line[_KEY_END:_KEY_END + 1] == b'"':
        return line[len(_KEY_PREFIX):_KEY_END].decode("ascii", "replace")
    try:
        return str(_loads(line)["k"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a crash in the middle of a file


@dataclass
class _Segments:
    """Index of one stage: key -> (segment file, offset, length), fed by tailing segments."""

    entries: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    last_scan: float = 0.0
    # writers only: key -> where, from <stage>/claims, read up to claims_offset
    claims: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    claims_offset: int = 0


@dataclass
class _Files:
    """This process's open files of one stage, kept open between writes (a write is then a
    lock, a read of the claims log and two appends: no open, stat or mkdir)."""

    lock: int
    segment: int  # this writer's own segment, O_APPEND
    claims: int  # the claims log, O_APPEND
    claims_in: int  # the claims log, for reading
    end: int  # the segment's size: this process is its only writer

    def close(self) -> None:
        for fd in (self.lock, self.segment, self.claims, self.claims_in):
            with contextlib.suppress(OSError):
                os.close(fd)


def _close_all(files: dict[str, _Files]) -> None:
    for f in files.values():
        f.close()
    files.clear()


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
        self._stages: dict[str, _Segments] = {}
        self.counts: Counter[str] = Counter()
        self._unlocked_warned = False
        self._files: dict[str, _Files] = {}
        weakref.finalize(self, _close_all, self._files)
        self._new_writer()

    def _new_writer(self) -> None:
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pid = os.getpid()
        _close_all(self._files)

    def close(self) -> None:
        """Close the files kept open for writing (they reopen on the next write)."""
        _close_all(self._files)

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
                pos = 0
                while pos < end:
                    nl = chunk.index(b"\n", pos)
                    key = _key_of(chunk[pos:nl])
                    if key is not None:
                        # first entry wins (segments in name order): two jobs that raced to
                        # compute one key never make a reader switch between their answers
                        seg.entries.setdefault(key, (name, start + pos, nl - pos))
                    pos = nl + 1
                seg.offsets[name] = start + end
        seg.last_scan = time.monotonic()
        return seg

    def _segments(self, stage: str) -> _Segments:
        seg = self._stages.get(stage)
        return seg if seg is not None else self._scan(stage)

    def _read(self, stage: str, where: tuple[str, int, int]) -> Any | None:
        name, offset, length = where
        try:
            with open(self.root / stage / name, "rb") as f:
                line = os.pread(f.fileno(), length, offset)
            return _loads(line)["v"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a corrupt line reads as a miss: the answer is computed again

    def get(self, stage: str, key: str) -> Any | None:
        seg = self._segments(stage)
        if key not in seg.entries and time.monotonic() - seg.last_scan > self.rescan_interval:
            seg = self._scan(stage)  # another process may have written it meanwhile
        where = seg.entries.get(key)
        value = self._read(stage, where) if where is not None else None
        self.counts[f"{stage}.{'hit' if value is not None else 'miss'}"] += 1
        return value

    def has(self, stage: str, key: str) -> bool:
        """Whether `key` is indexed, without reading its value or counting a lookup."""
        return key in self._segments(stage).entries

    def require(self, stage: str, key: str, what: str) -> Any | None:
        """Cached value, None on a miss; in offline mode a miss raises `CacheMiss`."""
        value = self.get(stage, key)
        if value is None and self.offline:
            raise CacheMiss(stage, what, key)
        return value

    def __len__(self) -> int:
        return sum(len(self._segments(s).entries) for s in STAGES)

    # -- writing -----------------------------------------------------------------------------
    def put(self, stage: str, key: str, value: Any, what: str = "") -> Any:
        """Store `value` under `key` unless another writer stored it first; return the value
        the cache serves for `key` from now on (`put_many` of one entry)."""
        return self.put_many(stage, [(key, value, what)])[0]

    def put_many(self, stage: str, entries: Sequence[tuple[str, Any, str]]) -> list[Any]:
        """Store each `(key, value, what)` unless another writer stored its key first; return
        the values the cache serves for those keys from now on: the first answer wins, for
        its writer too.

        The new entries go to the segment in one append, so the answers of one model request
        (the n hypotheses of a plan call) survive a kill together or not at all: a resumed run
        then asks for the same requests an uninterrupted one did, and each answer's share of
        its request's cost (the prompt, paid by the request's first child) is the same.

        Two jobs computing one key with a non-deterministic model (real vLLM is not bitwise
        reproducible) must not each keep their own answer: the loser's records would describe
        what no reader is ever served. So every writer, under the stage's lock (`flock` on
        `<stage>/.lock`), reads the stage's claims log (`<stage>/claims`: one line per key
        stored, naming its segment line) from where it last stopped, and appends its entries
        and their claims only for keys no claim names. A write costs one short read of that
        log, not a look at every segment. Where the file system refuses `flock` (Lustre
        without `-o flock`) writes go on unlocked, with a warning: two racing writers may then
        both store a key, and readers take the first segment's, as before.
        """
        if self.offline:
            raise RuntimeError("offline cache is read-only")
        lines = [_line({"k": key, "v": value, "what": what}) for key, value, what in entries]
        files = self._open(stage)
        seg = self._segments(stage)
        out: list[Any] = [value for _, value, _ in entries]
        new: dict[str, int] = {}  # key -> its position in `entries`, for keys stored now
        with self._stage_lock(files.lock, stage) as locked:
            claims, whole = self._claims(files.claims_in, seg)
            for i, (key, _, _) in enumerate(entries):
                if key in new:  # asked twice in one call: the first one wins here too
                    out[i] = out[new[key]]
                    continue
                first = claims.get(key) or seg.entries.get(key)
                won = self._read(stage, first) if first is not None else None
                if won is not None:
                    self.counts[f"{stage}.lost"] += 1
                    seg.entries[key] = first
                    out[i] = won
                else:
                    new[key] = i
            if not new:
                return out
            name = f"{self.writer}.jsonl"
            where: dict[str, tuple[str, int, int]] = {}
            offset = files.end
            for key, i in new.items():
                where[key] = (name, offset, len(lines[i]) - 1)
                offset += len(lines[i])
            try:
                _append(files.segment, b"".join(lines[i] for i in new.values()))
                files.end = offset
                claims_log = "".join(f"{k} {w[0]} {w[1]} {w[2]}\n"
                                     for k, w in where.items()).encode()
                if not whole:  # end a crashed writer's torn line, or it swallows the first claim
                    claims_log = b"\n" + claims_log
                _append(files.claims, claims_log)
                # where the log ended where it was read and no one else wrote since (the lock
                # held, and its size says so: a flock that locks one host only, NFS local_lock,
                # does not exclude another host's appends) these claims need no reading back
                own = (locked and whole and os.fstat(files.claims).st_size
                       == seg.claims_offset + len(claims_log))
            except BaseException:
                self._files.pop(stage).close()  # the segment's size is unknown: reopen it
                raise
            if own:
                for key, w in where.items():
                    seg.claims.setdefault(key, w)  # as reading them back would
                seg.claims_offset += len(claims_log)
        seg.entries.update(where)
        seg.offsets[name] = files.end  # all of this segment is indexed: a rescan skips it
        self.counts[f"{stage}.write"] += len(new)
        return out

    def _open(self, stage: str) -> _Files:
        """The stage's open files; a forked child gets its own segment (and writer name)."""
        if os.getpid() != self._pid:
            self._new_writer()
        files = self._files.get(stage)
        if files is None:
            folder = self.root / stage
            folder.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            opened: list[int] = []
            try:
                for path, mode in ((".lock", os.O_WRONLY | os.O_CREAT),
                                   (f"{self.writer}.jsonl", flags), (CLAIMS, flags),
                                   (CLAIMS, os.O_RDONLY)):
                    opened.append(os.open(folder / path, mode, 0o644))
            except BaseException:
                for fd in opened:
                    os.close(fd)
                raise
            files = _Files(*opened, end=os.fstat(opened[1]).st_size)
            self._files[stage] = files
        return files

    @contextlib.contextmanager
    def _stage_lock(self, fd: int, stage: str) -> Iterator[bool]:
        """Hold the stage's lock; yields whether it is held (False where flock is refused)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if not self._unlocked_warned:
                log.warning("cache %s: the file system refuses flock (%s); writes go on "
                            "unlocked, so racing jobs may each store one key",
                            self.root / stage, exc)
                self._unlocked_warned = True
            locked = False
        else:
            locked = True
        try:
            yield locked
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _claims(self, fd: int, seg: _Segments) -> tuple[dict[str, tuple[str, int, int]], bool]:
        """The claims appended since this process last read them, added to `seg.claims`, and
        whether the log ends on a whole line (no crashed writer's torn tail)."""
        parts, at = [], seg.claims_offset
        while True:
            part = os.pread(fd, 1 << 20, at)
            parts.append(part)
            at += len(part)
            if len(part) < 1 << 20:
                break
        chunk = b"".join(parts)
        end = chunk.rfind(b"\n") + 1  # whole lines only
        for raw in chunk[:end].splitlines():
            fields = raw.split(b" ")
            if len(fields) == 4:
                try:
                    where = (fields[1].decode(), int(fields[2]), int(fields[3]))
                except ValueError:
                    continue  # a line torn by a crash: its writer's entry is in its segment
                seg.claims.setdefault(fields[0].decode(), where)
        seg.claims_offset += end
        return seg.claims, end == len(chunk)

    def stats(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
