"""Requests per sample and the client's own CPU time per sample, max_n = 64, over real HTTP.

    python benchmarks/bench_http_clients.py [--samples 16] [--max-n 64]

The real clients (OpenAI planner and verifier, SAM client) with their shipped configs
(experiment=http_synthetic: qwen3vl_8b_instruct, sam3, qwen3vl_32b_thinking; JPEG images,
overlay + crop views) run the
pipeline on the synthetic dataset against the vLLM stand-in and the SAM server (classical
backend), each in its own process, so the CPU time measured here is the client's alone:
image encoding, overlays, RLE work, JSON, HTTP. A second pass re-reads everything from the cache.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, proc: subprocess.Popen, ok) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2)
            if ok(r):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max-n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    vport, sport = free_port(), free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "standin", "--port", str(vport),
                          "--num-samples", str(args.samples), "--seed", str(args.seed)],
                         cwd=REPO / "tests", env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "servers.sam_server", "--backend", "classical",
                          "--port", str(sport), "--log-level", "warning", "--max-in-flight",
                          "2", "--max-queued", "64"], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        api, sam = f"http://127.0.0.1:{vport}/v1", f"http://127.0.0.1:{sport}"
        wait(api + "/models", procs[0], lambda r: r.status_code == 200)
        wait(sam + "/health", procs[1], lambda r: r.json().get("ready"))
        os.environ.update(PLANNER_API_BASE=api, VERIFIER_API_BASE=api, EXECUTOR_API_BASE=sam)
        run(args)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def run(args: argparse.Namespace) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from rescue.cache import Cache
    from rescue.models.roles import Models
    from rescue.pipeline import Pipeline

    overrides = ["experiment=http_synthetic", f"dataset.num_samples={args.samples}",
                 f"seed={args.seed}", f"max_n={args.max_n}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = instantiate(cfg.dataset)
    ids = dataset.sample_ids()
    t = time.process_time()
    for i in ids:
        dataset.load(i)
    load_cpu = (time.process_time() - t) / len(ids)

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label in ("generate", "cached rerun"):
            models = Models(instantiate(cfg.planner), instantiate(cfg.executor),
                            instantiate(cfg.verifier))

            async def go(models=models):
                async with models.ready():
                    pipe = Pipeline(models.planner, models.executor, models.verifier,
                                    Cache(Path(tmp) / "cache"), max_n=args.max_n,
                                    samples_in_flight=int(cfg.pipeline.samples_in_flight),
                                    progress=False)
                    c0, w0 = time.process_time(), time.perf_counter()
                    recs = await pipe.run(dataset, ids)
                    return pipe, recs, time.process_time() - c0, time.perf_counter() - w0

            pipe, recs, cpu, wall = asyncio.run(go())
            n = len(ids)
            st = {role: getattr(models, role).stats() for role in ("planner", "executor",
                                                                   "verifier")}
            calls = pipe.stats
            rows.append((label, n, st, calls, cpu / n, wall / n, recs))

    print(f"RESCue HTTP clients: {args.samples} synthetic samples (256x256), max_n={args.max_n},"
          f" shipped configs; stand-in and SAM server (classical) in their own processes")
    print(f"of which synthetic scene generation (dataset.load): {load_cpu * 1000:.1f} ms "
          "CPU per sample")
    print()
    print("| pass | planner HTTP req/sample | executor HTTP req/sample | verifier HTTP "
          "req/sample | distinct prompts/sample | distinct masks/sample | client CPU ms/sample "
          "| wall s/sample |")
    print("|---|---|---|---|---|---|---|---|")
    for label, n, st, calls, cpu, wall, _ in rows:
        prompts = (calls.items["execute"] + calls.cached["execute"]) / n
        print(f"| {label} | {st['planner']['requests'] / n:.2f} | "
              f"{st['executor']['requests'] / n:.2f} | {st['verifier']['requests'] / n:.2f} | "
              f"{prompts:.1f} | {(calls.items['verify'] + calls.cached['verify']) / n:.1f} | "
              f"{cpu * 1000:.0f} | {wall:.2f} |")
    label, n, st, calls, *_ = rows[0]
    print()
    print(f"first pass: hypotheses {args.max_n * n}, execute deduped {calls.deduped['execute']}, "
          f"verify deduped {calls.deduped['verify']}, verify calls skipped by the empty-mask "
          f"rule are in 'verify' items; retries: planner {st['planner']['retries']}, executor "
          f"{st['executor']['retries']}, verifier {st['verifier']['retries']}")
    print(f"pipeline-level calls (one plan call per contiguous run): {dict(calls.requests)}")


if __name__ == "__main__":
    main()
