"""Is the client the bottleneck? Achieved ÷ capacity bound over real HTTP, against GPU-shaped
stand-in servers, with the client's CPU per sample (issue 16).

    python benchmarks/bench_http_clients.py [--samples 16] [--max-n 16 64]
        [--in-flight 1 4 8 32] [--loop-samples 1] [--repeats 1]

The real clients (OpenAI planner and verifier, SAM client) with their shipped configs
(experiment=http_synthetic: qwen3vl_8b_instruct, sam3, qwen3vl_32b_thinking) run the pipeline
on the synthetic dataset against servers of fixed latency and slots, each in its own process:
the vLLM stand-in (planner 0.2 s, 16 slots; verifier 0.5 s, 32 slots, its images left undecoded
(a real server decodes them on its own machine), its reasoning padded to
--reasoning-words; with --logprobs-at stream it sends top-20 logprobs on every token as vLLM
does, with answer (the default) a one-token continuation of 0.05 s follows each reply) and the SAM
server with a latency backend (0.1 s, --max-in-flight 4 slots). The capacity bound of a run is
its bottleneck server's requests × latency ÷ slots; achieved = bound ÷ wall (1.0: the servers
never waited for the client). Client CPU is this process's CPU time (worker threads included)
per sample. The one-call-at-a-time loop (how SAM 3 Agent calls its models) is the same
pipeline with one sample, one request and one hypothesis/prompt per request at a time; its
ratio to a row is the loop's wall per sample ÷ that row's. Every ratio is measured in this one
run.
The servers share the machine's cores with the client. With --repeats R each pipeline
configuration runs R times, one after the other, and its row is the run of median client CPU
(the lower middle one for an even R), with the range of the R runs beside it: on a shared 2-vCPU
VM one run's CPU per sample moves by ±15%. The one-call loop runs once (a minute a sample at
max_n 64). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PLANNER, VERIFIER = "Qwen3-VL-8B-Instruct", "Qwen3-VL-32B-Thinking"


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
    ap.add_argument("--max-n", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 8, 32])
    ap.add_argument("--loop-samples", type=int, default=1, help="0 skips the one-call loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each configuration; its row is the median run by client CPU")
    ap.add_argument("--latency", type=float, nargs=3, default=[0.2, 0.5, 0.1],
                    metavar=("PLANNER", "VERIFIER", "EXECUTOR"))
    ap.add_argument("--slots", type=int, nargs=3, default=[16, 32, 4],
                    metavar=("PLANNER", "VERIFIER", "EXECUTOR"))
    ap.add_argument("--reasoning-words", type=int, default=300)
    ap.add_argument("--logprobs-at", default="answer", choices=("stream", "answer"),
                    help="verifier.logprobs_at: answer (two-step) or stream (every token)")
    ap.add_argument("--continuation-latency", type=float, default=0.05)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. "
                    "verifier.max_concurrency=64")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "servers")])}
    vport, sport = free_port(), free_port()
    (lp, lv, le), (cp, cv, ce) = args.latency, args.slots
    procs = [
        subprocess.Popen([sys.executable, "-m", "standin", "--port", str(vport),
                          "--num-samples", str(args.samples), "--seed", str(args.seed),
                          "--planner-latency", str(lp), "--verifier-latency", str(lv),
                          "--planner-capacity", str(cp), "--verifier-capacity", str(cv),
                          "--reasoning-words", str(args.reasoning_words),
                          "--continuation-latency", str(args.continuation_latency),
                          "--opaque-verifier-images"],
                         cwd=REPO / "tests", env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "servers.sam_server", "--backend",
                          "sam_fakes:LatencyBackend", "-o", f"latency_s={le}", "--port",
                          str(sport), "--log-level", "warning", "--max-in-flight", str(ce),
                          "--max-queued", "1024"], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        api, sam = f"http://127.0.0.1:{vport}/v1", f"http://127.0.0.1:{sport}"
        wait(api + "/models", procs[0], lambda r: r.status_code == 200)
        wait(sam + "/health", procs[1], lambda r: r.json().get("ready"))
        os.environ.update(PLANNER_API_BASE=api, VERIFIER_API_BASE=api, EXECUTOR_API_BASE=sam)
        args.served_url = f"http://127.0.0.1:{vport}/standin/served"
        args.server_pids = [p.pid for p in procs]
        run(args)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, max_n: int, in_flight: int, samples: int,
            loop: bool = False) -> dict:
    """One fresh run (empty cache): wall, client CPU and each server's requests."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from rescue.cache import Cache
    from rescue.models.roles import Models
    from rescue.pipeline import Pipeline

    tmp = tempfile.TemporaryDirectory()
    overrides = ["experiment=http_synthetic", f"dataset.num_samples={args.samples}",
                 f"seed={args.seed}", f"max_n={max_n}", f"verifier.logprobs_at={args.logprobs_at}",
                 f"paths.cache_dir={tmp.name}", *args.overrides]  # compose: no hydra runtime
    if loop:
        overrides += ["planner.max_concurrency=1", "planner.max_hypotheses_per_request=1",
                      "executor.max_concurrency=1", "executor.max_prompts_per_request=1",
                      "verifier.max_concurrency=1"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = instantiate(cfg.dataset)
    ids = dataset.sample_ids()[:samples]
    models = Models(instantiate(cfg.planner), instantiate(cfg.executor),
                    instantiate(cfg.verifier))
    served0 = httpx.get(args.served_url).json()
    with tmp:
        async def go():
            async with models.ready():
                pipe = Pipeline(models.planner, models.executor, models.verifier,
                                Cache(Path(tmp.name) / "cache"), max_n=max_n,
                                samples_in_flight=in_flight, progress=False)
                s0 = [cpu_s(pid) for pid in args.server_pids]
                c0, w0 = time.process_time(), time.perf_counter()
                recs = await pipe.run(dataset, ids)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                return recs, cpu, wall, [cpu_s(p) - c for p, c in zip(args.server_pids, s0,
                                                                        strict=True)]

        recs, cpu, wall, server_cpu = asyncio.run(go())
    st = {role: getattr(models, role).stats() for role in ("planner", "executor", "verifier")}
    served = httpx.get(args.served_url).json()
    cont = served.get(f"{VERIFIER}/continuation", 0) - served0.get(f"{VERIFIER}/continuation", 0)
    (lp, lv, le), (cp, cv, ce) = args.latency, args.slots
    busy = {"planner": st["planner"]["requests"] * lp / cp,
            "verifier": ((st["verifier"]["requests"] - cont) * lv
                         + cont * args.continuation_latency) / cv,
            "executor": st["executor"]["requests"] * le / ce}
    bottleneck = max(busy, key=busy.get)
    failed = sum(1 for r in recs if any(c.error and c.error.startswith("request:")
                                        for c in getattr(r, "candidates", [])))
    return {"n": len(ids), "wall": wall, "cpu": cpu, "bound": busy[bottleneck], "cont": cont,
            "server_cpu": server_cpu,
            "bottleneck": bottleneck, "requests": {k: v["requests"] for k, v in st.items()},
            "retries": sum(v["retries"] for v in st.values()), "failed": failed}


def decode_figures(tokens: int = 400, top: int = 20, reps: int = 20) -> str:
    """Client CPU to read one verifier reply (`tokens` tokens, top-`top` logprobs each) and
    score it: the openai SDK's objects vs the clients' own decoder."""
    import json as std_json

    import openai

    from rescue.models.openai_verifier import OpenAIVerifier
    from rescue.models.replies import decode

    words = [" the", " region", " covers", ",", " yes", " no", "."]
    toks = [words[i % len(words)] for i in range(tokens - 2)] + ["</think>", "Yes"]
    entry = [{"token": t, "logprob": -0.1, "bytes": list(t.encode()),
              "top_logprobs": [{"token": t, "logprob": -0.1, "bytes": list(t.encode())}]
              + [{"token": f" w{j}", "logprob": -3.0 - j, "bytes": [32]}
                 for j in range(top - 1)]} for t in toks]
    body = std_json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant",
                                                    "content": "".join(toks)},
                                        "logprobs": {"content": entry}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                                     "total_tokens": tokens + 1}}).encode()
    v = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{query}")

    def timed(read) -> float:
        t = time.process_time()
        for _ in range(reps):
            read()
        return (time.process_time() - t) / reps

    plain = std_json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "".join(toks)}, "logprobs": None}]}).encode()
    one = std_json.dumps({"choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "Yes"}, "logprobs": {"content": entry[-1:]}}]}).encode()
    two = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{query}", logprobs_at="answer")

    def two_step() -> None:
        parsed = two.read(decode(plain).choices[0])
        tok = decode(one).choices[0].tokens()
        two._score_at(tok, 0, dict(parsed.meta))

    sdk = timed(lambda: v.read(openai.types.chat.ChatCompletion.model_validate(
        std_json.loads(body)).choices[0]))
    ours = timed(lambda: v.read(decode(body).choices[0]))
    answer = timed(two_step)
    return (f"reading one verifier reply of {tokens} tokens and scoring it, client CPU: "
            f"in-stream top-{top} logprobs ({len(body) / 1e6:.2f} MB) through openai SDK "
            f"objects {sdk * 1000:.1f} ms, through the own decoder {ours * 1000:.1f} ms "
            f"({sdk / ours:.1f}x less); two-step (reply without logprobs, "
            f"{len(plain) / 1e3:.1f} kB, + one-token continuation) {answer * 1000:.2f} ms "
            f"({sdk / answer:.0f}x less than the SDK)")


def spread(m: dict, args: argparse.Namespace) -> str:
    lo, hi = m["cpu_range"]
    return f" ({lo:.3f}-{hi:.3f})" if args.repeats > 1 else ""


def median_run(runs: list[dict]) -> dict:
    """The run of median client CPU per sample (the lower middle one of an even count), with
    the CPU range of all `runs` (`cpu_range`, s per sample) and their retries and failures."""
    ordered = sorted(runs, key=lambda m: m["cpu"] / m["n"])
    return {**ordered[(len(ordered) - 1) // 2],
            "cpu_range": (ordered[0]["cpu"] / ordered[0]["n"],
                          ordered[-1]["cpu"] / ordered[-1]["n"]),
            # any run's retries or failures flag the row: its CPU is in the range shown
            "retries": sum(m["retries"] for m in runs), "failed": sum(m["failed"] for m in runs)}


def run(args: argparse.Namespace) -> None:
    rows = []
    for max_n in args.max_n:
        for k in args.in_flight:
            rows.append((max_n, k, median_run([measure(args, max_n, k, args.samples)
                                               for _ in range(max(1, args.repeats))])))
    loops = {max_n: measure(args, max_n, 1, args.loop_samples, loop=True)
             for max_n in args.max_n} if args.loop_samples else {}

    (lp, lv, le), (cp, cv, ce) = args.latency, args.slots
    print(f"RESCue HTTP clients, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
          f"{os.cpu_count()} cores (servers on the same cores): {args.samples} synthetic samples"
          f" (256x256), shipped configs; servers planner {lp:g} s x {cp} slots, verifier "
          f"{lv:g} s x {cv} slots (reasoning {args.reasoning_words} words), "
          f"executor {le:g} s x {ce} slots; verifier.logprobs_at={args.logprobs_at} "
          f"(a continuation takes {args.continuation_latency:g} s)"
          + (f"; each pipeline row the median of {args.repeats} runs by client CPU (range in "
             "brackets)"
             if args.repeats > 1 else ""))
    print()
    print("| max_n | samples_in_flight | requests p/e/v (continuations) | bottleneck | bound s | "
          "wall s | achieved / bound | client CPU s/sample | CPU / wall | "
          "stand-in / SAM server CPU s/sample | x one-call loop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for max_n, k, m in rows:
        loop = loops.get(max_n)
        vs_loop = (f"{(loop['wall'] / loop['n']) / (m['wall'] / m['n']):.1f}" if loop else "-")
        r = m["requests"]
        print(f"| {max_n} | {k} | {r['planner']}/{r['executor']}/{r['verifier']} ({m['cont']}) | "
              f"{m['bottleneck']} | {m['bound']:.2f} | {m['wall']:.2f} | "
              f"{m['bound'] / m['wall']:.2f} | {m['cpu'] / m['n']:.3f}{spread(m, args)} | "
              f"{m['cpu'] / m['wall']:.2f} | {m['server_cpu'][0] / m['n']:.3f} / "
              f"{m['server_cpu'][1] / m['n']:.3f} | {vs_loop} |")
    for max_n, loop in loops.items():
        r = loop["requests"]
        print(f"\none-call-at-a-time loop, max_n={max_n}: {loop['n']} sample(s), "
              f"{loop['wall'] / loop['n']:.1f} s/sample, requests p/e/v "
              f"{r['planner']}/{r['executor']}/{r['verifier']}, client CPU "
              f"{loop['cpu'] / loop['n']:.3f} s/sample")
    print()
    print(decode_figures())
    bad = [(n, k) for n, k, m in rows if m["retries"] or m["failed"]]
    if bad:
        print(f"\nruns with retries or failed requests (figures less clean): {bad}")


if __name__ == "__main__":
    main()
