"""The cache at study size: opening an index, memory it holds, reads per second.

    python benchmarks/bench_cache.py [--entries 100000] [--value-bytes 2000]

Writes `entries` verdict-like values (a reasoning text of `value-bytes`) into a temporary cache,
then opens it in a fresh `Cache` as a resumed job would: prints the time to index it, the
resident memory the index adds, and random reads per second. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, uninstalled

from rescue.cache import Cache, make_key


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--value-bytes", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        keys = [make_key({"i": i}) for i in range(args.entries)]
        writer = Cache(d)
        t0 = time.perf_counter()
        for i, k in enumerate(keys):
            writer.put("verify", k, {"score": 0.5, "reasoning": "x" * args.value_bytes, "i": i})
        t1 = time.perf_counter()
        del writer
        size = sum(p.stat().st_size for p in (Path(d) / "verify").glob("*.jsonl"))
        before = rss_mb()
        reader = Cache(d)
        t2 = time.perf_counter()
        n = len(reader)
        t3 = time.perf_counter()
        after = rss_mb()
        sample = random.Random(0).sample(keys, min(20_000, len(keys)))
        t4 = time.perf_counter()
        assert all(reader.get("verify", k) is not None for k in sample)
        t5 = time.perf_counter()
    print(f"entries: {n:,}, {size / 2**20:,.0f} MiB on disk ({size / n:,.0f} B each)")
    print(f"writes:  {args.entries / (t1 - t0):,.0f} per s")
    held = max(after - before, 1e-9)
    print(f"index:   {t3 - t2:.2f} s to open, {held:,.0f} MiB resident "
          f"({held * 2**20 / n:,.0f} B per entry; the values are {size / 2**20 / held:,.0f}x that)")
    print(f"reads:   {len(sample) / (t5 - t4):,.0f} random gets per s")


if __name__ == "__main__":
    main()
