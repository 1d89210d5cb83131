"""SIGKILL the demo at random times, resume it, and compare with an uninterrupted run (issue 14).

    python benchmarks/bench_kill_resume.py [--kills 20] [--seed 0] [extra run.py overrides...]
    python benchmarks/bench_kill_resume.py --kills 20 dataset.num_samples=4 report.plot=false \
        report.overlays=0 selection.bootstrap=0      # a smaller demo (the README's figures)

Runs `python run.py` (the CPU demo, `logger=none`, `pipeline.progress=false`, plus the extra
overrides) twice uninterrupted, each in a fresh cache and run directory: the reference (the
first also warms the disk and bytecode caches; the shorter wall time is the kill window). Then
the same command in a fresh cache and run directory, killed (SIGKILL, its whole process group)
after a seeded random time drawn uniformly over that window, and rerun with the same cache and
run directory until it exits 0 (the resume); a run that ends before its kill time is compared
too and another drawn (at most 2K runs), until K kills have landed. Each resumed
`records.jsonl` and `metrics.csv` is compared byte for byte with the reference's, and each
cache is scanned (`rescue/cache.py`: `<root>/<stage>/<writer>.jsonl`, one JSON line per entry,
the writer's pid in its name): a line without its newline or that is not an entry is torn,
allowed only as the last line of a killed writer's segment; a key on two whole lines of one
stage is a duplicate (0 since `Cache.put` is first-answer-wins under the stage's lock); and a
reader (`Cache`) must serve each key's first whole line and know no key that only a torn tail
holds. Where each kill landed is counted: before the first cache write, mid-work, or after the
last one (while it reports). Wall and CPU time (of the run.py processes) are totals.
Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rescue.cache import Cache  # noqa: E402

COMPARED = ("records.jsonl", "metrics.csv")
MAX_RESUMES = 3


def command(run_dir: Path, cache: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "run.py", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}",
            "logger=none", "pipeline.progress=false", *extra]


ENV = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def run_to_end(cmd: list[str]) -> int:
    """Run `cmd` until it exits 0 (at most MAX_RESUMES times); the number of runs it took."""
    for attempt in range(1, MAX_RESUMES + 1):
        if subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True).returncode == 0:
            return attempt
    raise RuntimeError(f"{' '.join(cmd)} did not complete in {MAX_RESUMES} runs")


def cache_lines(cache: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in cache.glob("*/*.jsonl"))


@dataclass
class Scan:
    """What one cache's segments hold."""

    whole: int = 0
    torn_tails: int = 0  # the last line of a killed writer's segment: allowed
    torn_elsewhere: int = 0  # any other torn line: a defect
    duplicates: int = 0
    first: dict[str, dict[str, object]] = field(default_factory=dict)  # stage -> key -> value
    torn_keys: dict[str, set[str]] = field(default_factory=dict)  # stage -> keys of torn tails


def scan(cache: Path, killed: set[int]) -> Scan:
    out = Scan()
    for stage in sorted(p for p in cache.iterdir() if p.is_dir()):
        seen: Counter[str] = Counter()
        first = out.first.setdefault(stage.name, {})
        torn_keys = out.torn_keys.setdefault(stage.name, set())
        for seg in sorted(stage.glob("*.jsonl")):  # name order: the order readers take
            pid = int(seg.stem.rsplit("-", 2)[1])
            *lines, tail = seg.read_bytes().split(b"\n")
            if tail:  # no newline: a torn last line
                if pid in killed:
                    out.torn_tails += 1
                else:
                    out.torn_elsewhere += 1
                if tail.startswith(b'{"k":"') and len(tail) >= 70:
                    torn_keys.add(tail[6:70].decode("ascii", "replace"))
            for line in lines:
                try:
                    entry = json.loads(line)
                    key = entry["k"]
                except (ValueError, KeyError, TypeError):
                    out.torn_elsewhere += 1
                    continue
                out.whole += 1
                seen[key] += 1
                first.setdefault(key, entry["v"])
        out.duplicates += sum(n - 1 for n in seen.values())
    return out


def reader_agrees(cache: Path, found: Scan) -> bool:
    """A reader (`Cache`) serves each key's first whole line and knows nothing of a torn tail
    whose key no whole line holds."""
    reader = Cache(cache, offline=True)
    for stage, first in found.first.items():
        if any(reader.get(stage, k) != v for k, v in first.items()):
            return False
        if any(reader.has(stage, k) for k in found.torn_keys[stage] - set(first)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="killed and resumed runs")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    args, extra = ap.parse_known_args()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"demo: python run.py {' '.join(extra) or '(the full demo)'}"
          + ("  [a smaller demo than the default]" if extra else ""))
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as d:
        tmp = Path(d)
        walls = []
        for name in ("ref", "ref2"):  # the first also warms the disk and bytecode caches
            t0 = time.perf_counter()
            run_to_end(command(tmp / name, tmp / f"{name}-cache", extra))
            walls.append(time.perf_counter() - t0)
        ref = {name: (tmp / "ref" / name).read_bytes() for name in COMPARED}
        twice = all((tmp / "ref2" / name).read_bytes() == ref[name] for name in COMPARED)
        ref_wall = min(walls)
        ref_lines = cache_lines(tmp / "ref-cache")
        print(f"reference: {walls[0]:.1f} s and {walls[1]:.1f} s wall (two uninterrupted runs, "
              f"identical: {'yes' if twice else 'NO'}), {ref_lines} cache entries; kills drawn "
              f"uniformly in [0, {ref_wall:.1f}] s (seed {args.seed})")
        print(f"{'run':>4} {'kill at s':>9} {'landed':>14} {'cache lines':>12} "
              f"{'resumes':>7} {'identical':>9} {'torn':>5} {'dups':>5} {'reader ok':>9}")
        landed: Counter[str] = Counter()
        identical = torn = torn_bad = dups = reader_ok = 0
        i = 0
        while i - landed["after its end"] < args.kills and i < 2 * args.kills:
            run_dir, cache = tmp / f"run-{i}", tmp / f"cache-{i}"
            cmd = command(run_dir, cache, extra)
            at = rng.uniform(0.0, ref_wall)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            killed: set[int] = set()
            lines = ref_lines
            try:
                runs = 0 if proc.wait(timeout=at) == 0 else run_to_end(cmd)
                where = "after its end"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed.add(proc.pid)
                lines = cache_lines(cache) if cache.is_dir() else 0
                where = ("before writes" if lines == 0 else
                         "mid-work" if lines < ref_lines else "while reporting")
                runs = run_to_end(cmd)
            landed[where] += 1
            same = all((run_dir / name).read_bytes() == ref[name] for name in COMPARED)
            found = scan(cache, killed)
            ok = reader_agrees(cache, found)
            identical += same
            torn += found.torn_tails
            torn_bad += found.torn_elsewhere
            dups += found.duplicates
            reader_ok += ok
            print(f"{i:>4} {at:>9.1f} {where:>14} {lines:>5}/{ref_lines:<6} {runs:>7} "
                  f"{'yes' if same else 'NO':>9} {found.torn_tails:>5} {found.duplicates:>5} "
                  f"{'yes' if ok else 'NO':>9}")
            i += 1
    wall = time.perf_counter() - t_start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    print(f"kills: {i - landed['after its end']} in {i} runs ({dict(landed)}; a run that ended "
          "before its kill is compared too, and another run drawn)")
    print(f"resumed runs identical (records.jsonl and metrics.csv, bytes): {identical}/{i}")
    print(f"torn tails found: {torn} (last line of a killed writer's segment, ignored by "
          f"readers); torn lines elsewhere: {torn_bad}")
    print(f"duplicate keys: {dups}; a reader serves each key's first whole line and no torn "
          f"tail in {reader_ok}/{i} caches")
    print(f"total: {wall:.0f} s wall, {cpu:.0f} s CPU (run.py processes)")


if __name__ == "__main__":
    main()
