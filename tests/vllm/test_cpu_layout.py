"""The laptop path of the README ("Single-image inference on a laptop"), as a user types it:
`python -m servers.launch layout=cpu_qwen3vl_2b action=start`, `python run.py
experiment=infer_cpu image=... query=...`, `action=stop`. The layout's own commands (`vllm
serve` with its CPU flags and environment, the classical SAM server) serve the tier's tiny
random Qwen3-VL folders under the layout's served names; the only overrides are the model
folders (for the hub repos), free ports and a smaller KV cache, given to both commands alike.

A random model answers noise, so this checks what must hold whatever it says: the services
start and stop through the launcher, run.py exits 0 and writes its outputs, and every failed
candidate carries a classified `area:code` (most plans do not parse).

pytest runs this file before test_real_vllm.py, so its two engines are gone before the
session's own two start (2 cores here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vllm_harness import ROOT, TinyModels, free_port, offline_env

pytestmark = pytest.mark.vllm

CODE = re.compile(r"^(parse|ground|box|point|plan|execute|verify|request):[a-z_]+(\s|$)")
START_TIMEOUT_S = float(os.environ.get("RESCUE_VLLM_START_TIMEOUT", "900"))


def _scene(path: Path) -> Path:
    """A 96 x 64 picture: a red square and a blue disc on grey."""
    img = np.full((64, 96, 3), 128, np.uint8)
    img[16:44, 12:40] = (220, 30, 30)
    yy, xx = np.mgrid[:64, :96]
    img[(yy - 32) ** 2 + (xx - 68) ** 2 <= 14 ** 2] = (30, 40, 210)
    Image.fromarray(img).save(path)
    return path


def test_launcher_serves_the_cpu_layout_and_run_py_infers_with_it(
        tiny_models: TinyModels, tmp_path: Path) -> None:
    layout = [f"layout.services.planner.model={tiny_models.instruct}",
              f"layout.services.verifier.model={tiny_models.thinking}",
              *(f"layout.services.{s}.port={free_port()}"
                for s in ("executor", "planner", "verifier")),
              # 1 GiB each instead of the layout's 2: this machine is shared
              "layout.services.planner.env.VLLM_CPU_KVCACHE_SPACE=1",
              "layout.services.verifier.env.VLLM_CPU_KVCACHE_SPACE=1"]
    run_dir = tmp_path / "servers"
    env = offline_env(WANDB_MODE="disabled")
    for var in ("PLANNER_API_BASE", "VERIFIER_API_BASE", "EXECUTOR_API_BASE",
                "HYDRA_FULL_ERROR"):
        env.pop(var, None)

    def launch(action: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "servers.launch", "layout=cpu_qwen3vl_2b",
                               f"action={action}", f"run_dir={run_dir}",
                               f"timeout_s={START_TIMEOUT_S:g}", *layout],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(run_dir.glob("*.log")))

    started = launch("start", 3 * START_TIMEOUT_S + 120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr + logs()
        for name in ("executor", "planner", "verifier"):
            assert f"[{name}] ready at" in started.stdout, started.stdout
        print("\n" + "\n".join(x for x in started.stdout.splitlines() if "ready at" in x))
        served = (run_dir / "planner.log").read_text(errors="replace")
        assert "vllm.entrypoints.openai.api_server --model" in served  # the launcher's header
        assert "--served-model-name Qwen3-VL-2B-Instruct" in served
        assert "--enforce-eager" in served and "--dtype bfloat16" in served

        image = _scene(tmp_path / "scene.png")

        def infer(name: str, *extra: str) -> Path:
            out = tmp_path / name
            proc = subprocess.run(
                [sys.executable, "run.py", "experiment=infer_cpu", f"image={image}",
                 "query=the red square on the left", f"hydra.run.dir={out}",
                 f"paths.cache_dir={tmp_path / 'cache'}", "logger=none",
                 "pipeline.progress=false", *layout, *extra],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            assert proc.returncode == 0, proc.stderr[-4000:] + logs()
            assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
            return out

        out = infer("run")  # as the README types it
        # a grammar-constrained planner closes its JSON now and then, so some masks reach the
        # verifier: the classical server's box_points path and the thinking verifier's replies
        verified = infer("verified", "planner.structured_output=true", "max_n=8")
    finally:
        stopped = launch("stop", 300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for name in ("executor", "planner", "verifier"):
        assert f"[{name}] stopped" in stopped.stdout, stopped.stdout
    assert launch("status", 120).returncode == 3  # nothing answers any more

    for name in ("candidates.json", "mask.png", "overlay.png", "candidates.png"):
        assert (out / name).is_file(), name
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (64, 96) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / "overlay.png")).shape == (64, 96, 3)
    result = json.loads((out / "candidates.json").read_text())
    assert result["max_n"] == 4 and len(result["candidates"]) == 4
    assert result["calls"]["requests"]["plan"] == 1  # the four hypotheses in one request
    assert result["models"]["planner"]["model"] == "Qwen3-VL-2B-Instruct"
    assert result["models"]["verifier"]["model"] == "Qwen3-VL-2B-Thinking"
    assert result["models"]["executor"]["server"]["backend"] == "classical"
    assert result["models"]["executor"]["prompt_mode"] == "box_points"
    for c in result["candidates"]:  # noise in: classified failures, no crash
        if c["error"] is not None:
            assert CODE.match(c["error"]), c["error"]
            assert c["failed_stage"] in ("plan", "execute", "verify"), c
            assert not c["error"].startswith("request:"), c  # the servers took every request
    if result["selected"] is None:
        assert not mask.any()
    errors = [c["error"].split()[0] for c in result["candidates"] if c["error"]]
    print(f"infer_cpu: {4 - len(errors)} of 4 candidates without error; failures: {errors}")

    result = json.loads((verified / "candidates.json").read_text())
    cands = result["candidates"]
    assert len(cands) == 8
    planned = [c for c in cands if c["failed_stage"] != "plan"]
    assert planned, [c["error"] for c in cands]
    for c in cands:
        if c["error"] is not None:
            assert CODE.match(c["error"]) and not c["error"].startswith("request:"), c
        if c["verifier_score"] is not None:
            assert 0.0 <= c["verifier_score"] <= 1.0, c
    assert result["calls"]["requests"].get("execute", 0) >= 1  # the SAM server was asked
    print(f"infer_cpu, structured: {len(planned)} of 8 planned, "
          f"{sum(c['verifier_score'] is not None for c in cands)} scored, "
          f"{sum(c['error'] is None for c in cands)} without error; failures: "
          f"{[c['error'].split()[0] for c in cands if c['error']]}")
