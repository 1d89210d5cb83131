"""Two-step verdict vs in-stream logprobs against a real vLLM server: tokens, response bytes and
client CPU per verdict for `verifier.logprobs_at` stream and answer (its continuation naming the
images by uuid, the default, or sending them again: `verifier.continuation_images`), measured in
one run (issue 16 item 2).

    .venv-vllm/bin/python benchmarks/bench_verdict_logprobs.py [--url URL --model NAME]
        [--verdicts 24] [--top-logprobs 20] [--max-tokens 1024] [--min-tokens 0 300]

With --url (an OpenAI base URL, `.../v1`) the server there serves the verifier as --model; the
server needs --max-logprobs >= --top-logprobs. Without it the real-vLLM tier's tiny random
thinking Qwen3-VL (tests/vllm/build_tiny_qwen3vl.py) is built and served by vLLM's CPU build as
that tier serves it (`--reasoning-parser deepseek_r1`), with `--max-logprobs 20` and
`--enable-prompt-tokens-details`, so usage reports the prompt tokens the prefix cache served.

The real OpenAIVerifier of the shipped config (qwen3vl_32b_thinking, one overlay view) scores
the same synthetic masks with the same seeds in every mode, one request at a time, the modes
taking turns to go first (the later ones find the prompt in the prefix cache); one uncounted
verdict per mode first warms the client up. Naming the images by uuid makes the uuid their
prefix-cache identity, so `answer` shares no cached prompt blocks with the other two modes
(which share theirs): compare the cached prompt tokens the table lists per mode. Per verdict:
requests, prompt tokens (and the part the prefix cache served, where reported), completion
tokens, response body bytes, and client CPU: `time.process_time` around the whole verdict
(`ask`: the request encoded, sent, the replies decoded and read; the views are drawn beforehand,
not counted) and around the reading alone (the bodies decoded and scored again offline, as the
client does). `--min-tokens N` (sampling.extra min_tokens; the continuation drops it) makes
replies at least N tokens long, as a thinking model's are; a tiny random model's reasoning is
otherwise tens of tokens, and its long answers are mostly ambiguous noise, so fewer of them are
scored or continued. With the tiny server, also its CPU per verdict (/proc: the API server
process, where logprobs become JSON, and the engine core). Prints a table per --min-tokens;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = {"stream": ["verifier.logprobs_at=stream"],
         "answer": ["verifier.logprobs_at=answer", "verifier.continuation_images=uuid"],
         "answer, resend": ["verifier.logprobs_at=answer",
                            "verifier.continuation_images=resend"]}
"""Each mode's overrides: `answer` is the shipped default."""


@dataclass
class Row:
    """One mode's verdicts in one run."""

    sources: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    cached: list[int | None] = field(default_factory=list)
    completion: list[int] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    read_cpu: list[float] = field(default_factory=list)
    server_cpu: list[tuple[float, float]] = field(default_factory=list)  # (frontend, engine)
    bodies: list[list[bytes]] = field(default_factory=list)
    texts: list[tuple[Any, ...]] = field(default_factory=list)


def verifiers(url: str, model: str, args: argparse.Namespace, min_tokens: int):
    """(the synthetic samples, {mode: OpenAIVerifier}) from the shipped config."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    base = ["experiment=http_synthetic", "dataset.num_samples=4", f"verifier.base_url={url}",
            f"verifier.model={model}", f"verifier.sampling.max_tokens={args.max_tokens}",
            "verifier.overlay.views=[overlay]", f"verifier.top_logprobs={args.top_logprobs}"]
    if min_tokens:
        base.append(f"++verifier.sampling.extra={{min_tokens: {min_tokens}}}")
    out = {}
    for mode, overrides in MODES.items():
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*base, *overrides])
        out[mode] = instantiate(cfg.verifier)
    ds = instantiate(cfg.dataset)
    return [ds.load(i) for i in ds.sample_ids()], out


def mask(shape: tuple[int, ...], k: int) -> np.ndarray:
    h, w = shape[:2]
    m = np.zeros((h, w), dtype=bool)
    y, x = (7 * k) % (h // 2), (11 * k) % (w // 2)
    m[y: y + h // 3 + k % 5, x: x + w // 3 + 2 * (k % 7)] = True
    return m


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat; 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int | None) -> tuple[float, float]:
    """(the API server process's CPU seconds, its child processes' (the engine core))."""
    if pid is None:
        return 0.0, 0.0
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return cpu_s(pid), sum(cpu_s(k) for k in kids)


def reading_cpu(v: Any, bodies: list[bytes], reps: int) -> float:
    """Client CPU to decode a verdict's reply bodies and score them as `ask` does."""
    from rescue.models.replies import decode

    t = time.process_time()
    for _ in range(reps):
        choice = decode(bodies[0]).choices[0]
        verdict = v.read(choice)
        if len(bodies) > 1:
            v.answer_prefix(choice)
            v._score_at(decode(bodies[1]).choices[0].tokens(), 0, dict(verdict.meta))
    return (time.process_time() - t) / reps


async def measure(samples: list[Any], vs: dict[str, Any], n: int, reps: int,
                  pid: int | None = None) -> dict[str, Row]:
    import rescue.models.chat as chat_module

    rows = {mode: Row() for mode in MODES}
    seen: list[bytes] = []
    decode = chat_module.decode

    def kept(body, *a, **kw):
        seen.append(bytes(body))
        return decode(body, *a, **kw)

    chat_module.decode = kept
    try:
        warm = samples[0]  # the client's first call starts its HTTP client and worker threads
        for v in vs.values():
            v.seed = -1
            await v.ask("verify", v.render(warm, mask(warm.image.shape, n)))
        del seen[:]
        for k in range(n):
            sample = samples[k % len(samples)]
            messages = vs["stream"].render(sample, mask(sample.image.shape, k))
            modes = list(MODES)
            for mode in modes[k % len(modes):] + modes[:k % len(modes)]:
                v, row = vs[mode], rows[mode]
                v.seed = k
                n0, s0, c0 = len(seen), server_cpu(pid), time.process_time()
                verdict, replies = await v.ask("verify", messages)
                row.cpu.append(time.process_time() - c0)
                s1 = server_cpu(pid)
                row.server_cpu.append((s1[0] - s0[0], s1[1] - s0[1]))
                bodies = seen[n0:]
                cost = verdict.meta["cost"]
                row.sources.append(verdict.source or "failed")
                row.scores.append(verdict.score if verdict.source == "logprobs" else None)
                row.requests.append(len(replies))
                row.prompt.append(cost.get("prompt_tokens", 0))
                details = [r.usage.get("prompt_tokens_details") or {} for r in replies]
                hits = [d.get("cached_tokens") for d in details]
                row.cached.append(None if None in hits else sum(hits))
                row.completion.append(cost.get("completion_tokens", 0))
                row.bytes.append(sum(len(b) for b in bodies))
                row.bodies.append(bodies)
                msg = replies[0].choices[0].message if replies and replies[0].choices else None
                row.texts.append((getattr(msg, "content", None), getattr(msg, "reasoning", None)))
    finally:
        chat_module.decode = decode
        for v in vs.values():
            await v.aclose()
    for mode, row in rows.items():
        row.read_cpu = [reading_cpu(vs[mode], b, reps) for b in row.bodies]
    return rows


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def report(rows: dict[str, Row], min_tokens: int, args: argparse.Namespace,
           served: bool) -> None:
    s, a = rows["stream"], rows["answer"]
    n = len(s.cpu)
    print(f"\nmin_tokens={min_tokens}: {n} verdicts, top_logprobs {args.top_logprobs}, "
          f"max_tokens {args.max_tokens}")
    print("| mode | logprobs / parsed / failed | requests | prompt tokens (cached) | "
          "completion tokens | tokens | body bytes | client CPU ms | reading CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        counts = [sum(x == k for x in r.sources) for k in ("logprobs", "parsed")]
        cached = ("?" if None in r.cached else f"{mean(r.cached):.1f}")
        print(f"| {mode} | {counts[0]} / {counts[1]} / {n - sum(counts)} | "
              f"{mean(r.requests):.2f} | {mean(r.prompt):.1f} ({cached}) | "
              f"{mean(r.completion):.1f} | {mean(r.prompt) + mean(r.completion):.1f} | "
              f"{mean(r.bytes):.0f} | {mean(r.cpu) * 1e3:.2f} | {mean(r.read_cpu) * 1e3:.3f} |")
    print(f"| stream / answer | | {mean(s.requests) / mean(a.requests):.2f} | "
          f"{mean(s.prompt) / mean(a.prompt):.2f} | "
          f"{mean(s.completion) / mean(a.completion):.2f} | "
          f"{(mean(s.prompt) + mean(s.completion)) / (mean(a.prompt) + mean(a.completion)):.2f}"
          f" | {mean(s.bytes) / mean(a.bytes):.1f} | {mean(s.cpu) / mean(a.cpu):.2f} | "
          f"{mean(s.read_cpu) / mean(a.read_cpu):.1f} |")
    same = sum(x == y for x, y in zip(s.texts, a.texts, strict=True))
    both = [(x, y) for x, y in zip(s.scores, a.scores, strict=True)
            if x is not None and y is not None]
    diff = [abs(x - y) for x, y in both]
    r = rows["answer, resend"]
    print(f"| answer, resend / answer | | {mean(r.requests) / mean(a.requests):.2f} | "
          f"{mean(r.prompt) / mean(a.prompt):.2f} | "
          f"{mean(r.completion) / mean(a.completion):.2f} | | "
          f"{mean(r.bytes) / mean(a.bytes):.2f} | {mean(r.cpu) / mean(a.cpu):.2f} | |")
    if served:
        fe = {m: mean([c[0] for c in r.server_cpu]) for m, r in rows.items()}
        en = {m: mean([c[1] for c in r.server_cpu]) for m, r in rows.items()}
        print("server CPU ms/verdict (10 ms ticks, summed over the run): API server "
              + ", ".join(f"{m} {fe[m] * 1e3:.1f}" for m in rows) + "; engine core "
              + ", ".join(f"{m} {en[m] * 1e3:.1f}" for m in rows))
    print(f"per verdict; the same first reply in both modes {same}/{n}; scored from logprobs "
          f"in both {len(both)}: |score difference| mean {mean(diff):.3f}, max "
          f"{max(diff, default=float('nan')):.3f}; answer by uuid and resending the images: "
          f"the same score in {sum(x == y for x, y in zip(a.scores, r.scores, strict=True))}"
          f"/{n}")


def serve_tiny(root: Path):
    sys.path.insert(0, str(REPO / "tests" / "vllm"))
    from vllm_harness import VERIFIER, VllmServer, build_model, wait_all

    t0 = time.monotonic()
    model_dir = build_model(root / "tiny-qwen3vl-thinking", "thinking")
    server = VllmServer(VERIFIER, model_dir, [
        "--max-logprobs", "20", "--reasoning-parser", "deepseek_r1",
        "--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--enable-prompt-tokens-details"],
        root / "verifier.log")
    server.start()
    try:
        wait_all([server], float(os.environ.get("RESCUE_VLLM_START_TIMEOUT", "900")))
    except BaseException:
        server.stop()
        raise
    print(f"tiny random thinking Qwen3-VL served by vLLM's CPU build after "
          f"{time.monotonic() - t0:.0f} s (log {server.log})", flush=True)
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="the verifier's OpenAI base URL; none: serve the tiny model")
    ap.add_argument("--model", default="Qwen3-VL-32B-Thinking", help="its served model name")
    ap.add_argument("--verdicts", type=int, default=24)
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--min-tokens", type=int, nargs="+", default=[0, 300])
    ap.add_argument("--reps", type=int, default=20, help="repetitions of the offline reading")
    args = ap.parse_args()
    print(f"RESCue two-step verdict vs in-stream logprobs, {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} {os.cpu_count()} cores (server on the same cores)")
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url, model = args.url, args.model
            else:
                server = serve_tiny(Path(tmp))
                url, model = server.api, server.name
            for min_tokens in args.min_tokens:
                samples, vs = verifiers(url, model, args, min_tokens)
                pid = server.proc.pid if server is not None and server.proc else None
                rows = asyncio.run(measure(samples, vs, args.verdicts, args.reps, pid))
                report(rows, min_tokens, args, pid is not None)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
