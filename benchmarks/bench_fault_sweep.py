"""What faults cost a whole run: `python run.py` through fault-injecting proxies at a sweep of
fault rates, against a clean run (issue 14).

    python benchmarks/bench_fault_sweep.py [--rates 0 0.1 0.3 0.5] [--seed 0]

The workload and servers of tests/test_faults_end_to_end.py, imported from it: the real clients
(experiment=http_synthetic, 4 synthetic samples, max_n=8) against the vLLM stand-in (a thread
here) and the SAM server (classical backend, its own process), with that test's client timeouts
and retry policy. First a clean run straight to the servers; then, per rate, a run in a fresh
cache with each server behind tests/faultproxy.py faulting that share of every request (GETs of
the preflight and POSTs of the work), evenly over its kinds (500, 503, hang, drop, cut,
truncate, garbage, shape), seeded. Per rate: wall and CPU time of `run.py`, the faults injected
(GET/POST), the retries and failed calls the run's endpoints counted (stats.json; the
preflight's retries are not counted there), the candidates that failed on a request, and
whether records.jsonl (timings aside) and metrics.csv equal the clean run's. Rate 0 measures
the proxies alone. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "servers"), str(ROOT)]  # as pytest

from faultproxy import FaultPlan, FaultProxy  # noqa: E402
from test_faults_end_to_end import TIMEOUT_S, launch, records, serving  # noqa: E402
from test_http_end_to_end import load_samples  # noqa: E402


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_run(run_dir: Path, vllm: str, sam: str, cache: Path) -> dict:
    cpu0, t0 = cpu_children(), time.perf_counter()
    proc = launch(run_dir, vllm, sam, cache)
    out = {"wall": time.perf_counter() - t0, "cpu": cpu_children() - cpu0,
           "ok": proc.returncode == 0}
    if not out["ok"]:
        out["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return out
    endpoints = json.loads((run_dir / "stats.json").read_text())["endpoints"]
    out["retries"] = sum(e["retries"] for e in endpoints.values())
    out["failures"] = sum(e["failures"] for e in endpoints.values())
    out["failed_candidates"] = sum((c["error"] or "").startswith("request:")
                                   for r in records(run_dir) for c in r["candidates"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    ap.add_argument("--seed", type=int, default=0, help="seeds which requests are faulted")
    args = ap.parse_args()
    t_start, self0, children0 = time.perf_counter(), cpu_self(), cpu_children()
    with tempfile.TemporaryDirectory(prefix="fault-sweep-") as d:
        tmp = Path(d)
        with serving(load_samples(), tmp) as (vllm, sam):
            clean = one_run(tmp / "clean", vllm, sam, tmp / "cache-clean")
            if not clean["ok"]:
                raise SystemExit(f"the clean run failed: {clean['error']}")
            want_records = records(tmp / "clean")
            want_metrics = (tmp / "clean" / "metrics.csv").read_bytes()
            print("workload: tests/test_faults_end_to_end.py (http_synthetic, 4 samples, "
                  f"max_n=8; client timeout {TIMEOUT_S:g} s, a hang {2 * TIMEOUT_S:g} s)")
            print(f"{'rate':>5} {'wall s':>7} {'cpu s':>6} {'faults GET/POST':>16} "
                  f"{'retries':>7} {'failed calls':>12} {'failed cands':>12} "
                  f"{'records =':>9} {'metrics =':>9}")
            print(f"{'clean':>5} {clean['wall']:>7.1f} {clean['cpu']:>6.1f} {'-':>16} "
                  f"{clean['retries']:>7} {clean['failures']:>12} "
                  f"{clean['failed_candidates']:>12} {'-':>9} {'-':>9}")
            for rate in args.rates:
                plan = FaultPlan.even(rate, seed=args.seed, hang_s=2 * TIMEOUT_S)
                name = f"rate-{rate:g}"
                with FaultProxy(vllm, plan) as chat, FaultProxy(sam, plan) as seg:
                    got = one_run(tmp / name, chat.url, seg.url, tmp / f"cache-{name}")
                faults = {m: sum(n for p in (chat, seg) for (mm, _), n in p.by_method.items()
                                 if mm == m) for m in ("GET", "POST")}
                head = (f"{rate:>5.0%} {got['wall']:>7.1f} {got['cpu']:>6.1f} "
                        f"{faults['GET']:>7}/{faults['POST']:<8}")
                if not got["ok"]:
                    print(f"{head} run failed: {got['error']}")
                    continue
                same_records = records(tmp / name) == want_records
                same_metrics = (tmp / name / "metrics.csv").read_bytes() == want_metrics
                print(f"{head} {got['retries']:>7} {got['failures']:>12} "
                      f"{got['failed_candidates']:>12} {'yes' if same_records else 'NO':>9} "
                      f"{'yes' if same_metrics else 'NO':>9}")
    wall = time.perf_counter() - t_start
    print(f"total: {wall:.0f} s wall, {cpu_children() - children0:.0f} s CPU in run.py and the "
          f"SAM server, {cpu_self() - self0:.0f} s in this process (stand-in, proxies)")


if __name__ == "__main__":
    main()
