"""The launcher: golden commands of every layout (through real Hydra composition), readiness and
timeouts against real processes, stop, the deploy wrappers, download_models' error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sam_harness import REPO, free_port

from servers import download_models, launch
from servers.launch import LaunchArgs, LaunchError, compose_layout, parse_args, resolve_specs
from servers.layout import LayoutError, ServiceSpec, layout_specs, render_flags

VLLM_COMMON = ["--limit-mm-per-prompt", '{"image": 2}']

GOLDEN = {
    "mi325x_4": {
        "executor": (
            {"HIP_VISIBLE_DEVICES": "3"},
            ["python", "-m", "servers.sam_server", "--backend", "sam3", "--host", "127.0.0.1",
             "--port", "8001", "-o", "device=cuda", "-o", "dtype=bfloat16", "-o",
             "enable_points=true", "--image-cache-size", "64", "--max-in-flight", "2",
             "--max-queued", "64", "--max-prompts", "256"]),
        "verifier": (
            {"HIP_VISIBLE_DEVICES": "0,1"},
            ["vllm", "serve", "Qwen/Qwen3-VL-32B-Thinking", "--host", "127.0.0.1", "--port",
             "8000", "--served-model-name", "Qwen3-VL-32B-Thinking", "--tensor-parallel-size",
             "2", "--max-model-len", "49152", "--gpu-memory-utilization", "0.9",
             *VLLM_COMMON, "--reasoning-parser", "deepseek_r1", "--generation-config", "vllm",
             "--max-logprobs", "20"]),
        "planner": (
            {"HIP_VISIBLE_DEVICES": "2"},
            ["vllm", "serve", "Qwen/Qwen3-VL-8B-Instruct", "--host", "127.0.0.1", "--port",
             "8002", "--served-model-name", "Qwen3-VL-8B-Instruct", "--tensor-parallel-size",
             "1", "--max-model-len", "16384", "--gpu-memory-utilization", "0.9", *VLLM_COMMON,
             "--generation-config", "vllm", "--max-logprobs", "20"]),
    },
    "h100_1": {
        "executor": (
            {"CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
            ["python", "-m", "servers.sam_server", "--backend", "sam3", "--host", "127.0.0.1",
             "--port", "8001", "-o", "device=cuda", "-o", "dtype=bfloat16", "-o",
             "enable_points=true", "--image-cache-size", "16", "--max-in-flight", "2",
             "--max-queued", "64", "--max-prompts", "256"]),
        "verifier": (
            {"CUDA_VISIBLE_DEVICES": "0"},
            ["vllm", "serve", "Qwen/Qwen3-VL-32B-Thinking-FP8", "--host", "127.0.0.1", "--port",
             "8000", "--served-model-name", "Qwen3-VL-32B-Thinking", "--tensor-parallel-size",
             "1", "--max-model-len", "49152", "--kv-cache-dtype", "fp8",
             "--gpu-memory-utilization", "0.55",
             *VLLM_COMMON, "--reasoning-parser", "deepseek_r1", "--generation-config", "vllm",
             "--max-logprobs", "20"]),
        "planner": (
            {"CUDA_VISIBLE_DEVICES": "0"},
            ["vllm", "serve", "Qwen/Qwen3-VL-8B-Instruct-FP8", "--host", "127.0.0.1", "--port",
             "8002", "--served-model-name", "Qwen3-VL-8B-Instruct", "--tensor-parallel-size",
             "1", "--max-model-len", "16384", "--gpu-memory-utilization", "0.25", *VLLM_COMMON,
             "--generation-config", "vllm", "--max-logprobs", "20"]),
    },
    "cpu": {
        "executor": (
            {},
            ["python", "-m", "servers.sam_server", "--backend", "classical", "--host",
             "127.0.0.1", "--port", "8001", "--image-cache-size", "8", "--max-in-flight", "2",
             "--max-queued", "16"]),
    },
    "cpu_qwen3vl_2b": {
        "executor": (
            {},
            ["python", "-m", "servers.sam_server", "--backend", "classical", "--host",
             "127.0.0.1", "--port", "8001", "--image-cache-size", "8", "--max-in-flight", "2",
             "--max-queued", "16"]),
        "planner": (
            {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto"},
            ["python", "-m", "vllm.entrypoints.openai.api_server", "--model",
             "Qwen/Qwen3-VL-2B-Instruct", "--host", "127.0.0.1", "--port",
             "8002", "--served-model-name", "Qwen3-VL-2B-Instruct", "--dtype", "bfloat16",
             "--enforce-eager", "--max-model-len", "8192", "--max-num-seqs", "8",
             "--limit-mm-per-prompt",
             '{"image": 1, "video": 0}', "--generation-config", "vllm", "--max-logprobs", "20"]),
        "verifier": (
            {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto"},
            ["python", "-m", "vllm.entrypoints.openai.api_server", "--model",
             "Qwen/Qwen3-VL-2B-Thinking", "--host", "127.0.0.1", "--port",
             "8000", "--served-model-name", "Qwen3-VL-2B-Thinking", "--dtype", "bfloat16",
             "--enforce-eager", "--max-model-len", "8192", "--max-num-seqs", "8",
             "--limit-mm-per-prompt",
             '{"image": 2, "video": 0}', "--reasoning-parser", "deepseek_r1",
             "--generation-config", "vllm", "--max-logprobs", "20"]),
    },
}


@pytest.mark.parametrize("layout", sorted(GOLDEN))
def test_golden_commands(layout: str) -> None:
    specs = resolve_specs(LaunchArgs(layout=layout))
    got = {s.name: (s.env, list(s.argv)) for s in specs}
    assert got == GOLDEN[layout]
    # start order: the SAM server first (fixed memory), then the vLLM engines
    assert specs[0].name == "executor"


def test_layout_shape_for_clients() -> None:
    """Clients interpolate endpoints from the composed layout (e.g. `${layout.services...}`)."""
    mi = compose_layout("mi325x_4")
    assert mi["services"]["verifier"]["url"] == "http://127.0.0.1:8000/v1"
    assert mi["services"]["planner"]["url"] == "http://127.0.0.1:8002/v1"
    assert mi["services"]["executor"]["url"] == "http://127.0.0.1:8001"
    assert mi["device_env"] == "HIP_VISIBLE_DEVICES" and mi["start"] == "parallel"
    h100 = compose_layout("h100_1")
    assert h100["device_env"] == "CUDA_VISIBLE_DEVICES" and h100["start"] == "sequential"
    fractions = [h100["services"][s]["args"]["gpu-memory-utilization"]
                 for s in ("verifier", "planner")]
    assert sum(fractions) <= 0.85  # leaves room for SAM3 on the same GPU
    assert set(compose_layout("cpu")["services"]) == {"executor"}


def test_root_config_composes_the_cpu_layout() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["layout=mi325x_4"])
    assert cfg.layout.services.executor.port == 8001
    assert cfg.layout.services.verifier.url == "http://127.0.0.1:8000/v1"


def test_overrides_and_service_selection() -> None:
    args = parse_args(["layout=mi325x_4", "action=print", "services=[planner, executor]",
                       "layout.services.planner.port=9002",
                       "layout.services.planner.args.max-model-len=8192", "timeout_s=5"])
    assert args.action == "print" and args.services == ("planner", "executor")
    specs = resolve_specs(args)
    assert [s.name for s in specs] == ["executor", "planner"]  # layout order, not argv order
    planner = specs[1]
    assert planner.port == 9002 and planner.startup_timeout_s == 5
    assert planner.argv[planner.argv.index("--max-model-len") + 1] == "8192"
    assert planner.ready_url == "http://127.0.0.1:9002/v1/models"


@pytest.mark.parametrize(("argv", "message"), [
    (["layout=cpu", "services=[verifier]"], "has no service verifier (it has: executor)"),
    (["layout=nope"], "no layout 'nope'"),
    (["action=launch"], "action must be one of"),
    (["oops"], "key=value"),
])
def test_bad_arguments_name_the_problem(argv: list[str], message: str, capsys) -> None:
    assert launch.main(argv) == 1
    assert message in capsys.readouterr().err


def test_render_flags() -> None:
    assert render_flags({"a": 1, "b": True, "c": False, "d": None, "e": [1, 2],
                         "f": {"image": 2}, "g": "x y"}) == [
        "--a", "1", "--b", "--e", "1", "--e", "2", "--f", '{"image": 2}', "--g", "x y"]


def test_layout_errors() -> None:
    with pytest.raises(LayoutError, match="kind"):
        layout_specs({"name": "x", "services": {"a": {"kind": "tgi", "port": 1,
                                                      "command": ["x"]}}})
    with pytest.raises(LayoutError, match="device_env"):
        layout_specs({"name": "x", "services": {"a": {"kind": "sam", "port": 1, "command": ["x"],
                                                      "backend": "classical", "devices": [0]}}})
    with pytest.raises(LayoutError, match="needs 'model'"):
        layout_specs({"name": "x", "services": {"a": {"kind": "vllm", "port": 1,
                                                      "command": ["vllm", "serve"]}}})


def test_print_action_shows_env_and_command(capsys) -> None:
    assert launch.main(["layout=mi325x_4", "action=print", "services=[verifier]"]) == 0
    out = capsys.readouterr().out
    assert ("HIP_VISIBLE_DEVICES=0,1 vllm serve Qwen/Qwen3-VL-32B-Thinking --host 127.0.0.1 "
            "--port 8000") in out
    assert "--limit-mm-per-prompt '{\"image\": 2}'" in out  # quoted for a shell
    assert "GET http://127.0.0.1:8000/v1/models" in out


@pytest.mark.parametrize(("script", "service", "needle"), [
    ("deploy_llm.sh", "verifier", "vllm serve Qwen/Qwen3-VL-32B-Thinking "),
    ("deploy_planner_llm.sh", "planner", "vllm serve Qwen/Qwen3-VL-8B-Instruct "),
    ("deploy_sam.sh", "executor", "-m servers.sam_server --backend sam3"),
])
def test_deploy_wrappers(script: str, service: str, needle: str) -> None:
    r = subprocess.run(["bash", str(REPO / "servers" / script), "action=print"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RESCUE_LAYOUT": "mi325x_4"})
    assert r.returncode == 0, r.stderr
    assert f"# {service} (" in r.stdout and needle in r.stdout
    assert r.stdout.count("\n# ") == 1  # only its own service


# -- real processes ----------------------------------------------------------------------------

def _spec(name: str, code: str, kind: str = "sam", timeout: float = 3.0,
          served: str | None = None, port: int | None = None) -> ServiceSpec:
    port = port or free_port()
    return ServiceSpec(name=name, kind=kind, argv=(sys.executable, "-c", code), env={},
                       host="127.0.0.1", port=port, startup_timeout_s=timeout,
                       served_model_name=served)


FAKE_VLLM = textwrap.dedent("""
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "tiny-model"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    print("fake vllm up", flush=True)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_never_ready_service_times_out_with_its_log(tmp_path: Path) -> None:
    spec = _spec("sleepy", "import time; print('loading weights...', flush=True); "
                           "time.sleep(60)", timeout=1.5)
    proc = launch.spawn(spec, tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LaunchError) as err:
            launch.wait_ready(spec, tmp_path, proc=proc, poll_s=0.1)
        assert time.monotonic() - t0 < 30
        msg = str(err.value)
        assert "'sleepy' not ready after 1.5 s" in msg
        assert "loading weights..." in msg  # the log tail
        assert "/health" in msg
    finally:
        assert launch.stop_service(spec, tmp_path, timeout_s=5).startswith("stopped")
    assert proc.poll() is not None
    assert not (tmp_path / "sleepy.pid").exists()


def test_service_that_exits_fails_fast(tmp_path: Path) -> None:
    spec = _spec("crashy", "import sys; print('CUDA error: no device', flush=True); sys.exit(3)",
                 timeout=60)
    proc = launch.spawn(spec, tmp_path)
    with pytest.raises(LaunchError, match=r"'crashy' exited \(code 3\)") as err:
        launch.wait_ready(spec, tmp_path, proc=proc, poll_s=0.05)
    assert "CUDA error: no device" in str(err.value)


def test_vllm_readiness_checks_the_served_model(tmp_path: Path) -> None:
    port = free_port()
    code = FAKE_VLLM.replace("int(sys.argv[1])", str(port))
    good = _spec("planner", code, kind="vllm", served="tiny-model", port=port, timeout=20)
    proc = launch.spawn(good, tmp_path)
    try:
        assert launch.wait_ready(good, tmp_path, proc=proc, poll_s=0.05) >= 0
        wrong = ServiceSpec(**{**good.__dict__, "served_model_name": "other-model"})
        with pytest.raises(LaunchError, match="not 'other-model'"):
            launch.wait_ready(wrong, tmp_path, proc=proc, poll_s=0.05)
    finally:
        launch.stop_service(good, tmp_path, timeout_s=5)


def test_sigterm_ignored_gets_sigkill(tmp_path: Path) -> None:
    spec = _spec("stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             " print('up', flush=True); time.sleep(60)")
    proc = launch.spawn(spec, tmp_path)
    deadline = time.monotonic() + 30
    while "up" not in (tmp_path / "stubborn.log").read_text().splitlines():  # handler is set
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert launch.stop_service(spec, tmp_path, timeout_s=0.5).startswith("killed (SIGKILL")
    assert proc.poll() is not None  # gone (and reaped)
    assert not Path(f"/proc/{proc.pid}").exists()


def _launch(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servers.launch", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_start_status_stop_a_real_sam_server(tmp_path: Path) -> None:
    port = free_port()
    common = ["layout=cpu", f"run_dir={tmp_path}", f"layout.services.executor.port={port}"]
    r = _launch(*common, "action=start")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"[executor] ready at http://127.0.0.1:{port}" in r.stdout
        rec = json.loads((tmp_path / "executor.pid").read_text())
        # the launcher has exited: the server lives on in its own session
        st = _launch(*common, "action=status")
        assert st.returncode == 0 and "ready" in st.stdout and f"pid {rec['pid']}" in st.stdout
        again = _launch(*common, "action=start")
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stop = _launch(*common, "action=stop")
    assert stop.returncode == 0 and "[executor] stopped (SIGTERM)" in stop.stdout
    assert _launch(*common, "action=status").returncode == 3
    assert "Uvicorn running on" in (tmp_path / "executor.log").read_text()


def test_port_taken_by_a_stranger_is_refused(tmp_path: Path) -> None:
    port = free_port()
    code = FAKE_VLLM.replace("int(sys.argv[1])", str(port))
    stranger = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert stranger.stdout is not None and b"up" in stranger.stdout.readline()
        r = _launch("layout=cpu", f"run_dir={tmp_path}", f"layout.services.executor.port={port}",
                    "action=start")
        assert r.returncode == 1 and "already in use" in r.stderr
    finally:
        stranger.kill()
        stranger.wait(5)


def test_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    good = _spec("first", "import time; time.sleep(60)", timeout=30)
    bad = _spec("second", "import sys; sys.exit(5)", timeout=30)
    # parallel start: both are spawned, then `second` is found dead while waiting for it;
    # `first`, started by the same invocation, must be stopped again
    args = LaunchArgs(layout="cpu", action="start", run_dir=tmp_path, stop_timeout_s=5)
    with pytest.raises(LaunchError, match="'second' exited"):
        launch.do_start([bad, good], args, sequential=False)
    assert launch.read_pid(tmp_path, "first") is None  # stopped again
    assert launch.read_pid(tmp_path, "second") is None


# -- download_models ---------------------------------------------------------------------------

def test_download_plan_and_dry_run(capsys) -> None:
    specs = resolve_specs(LaunchArgs(layout="mi325x_4"))
    plan = download_models.planned_downloads(specs)
    assert [(d.service, d.repo_id) for d in plan] == [
        ("executor", "facebook/sam3"), ("verifier", "Qwen/Qwen3-VL-32B-Thinking"),
        ("planner", "Qwen/Qwen3-VL-8B-Instruct")]
    assert plan[0].allow_patterns == ("sam3.pt", "config.json")
    cpu = download_models.planned_downloads(resolve_specs(LaunchArgs(layout="cpu_qwen3vl_2b")))
    assert [(d.service, d.repo_id, d.allow_patterns) for d in cpu] == [
        ("planner", "Qwen/Qwen3-VL-2B-Instruct", None),
        ("verifier", "Qwen/Qwen3-VL-2B-Thinking", None)]  # GrabCut needs no weights
    assert download_models.main(["layout=cpu"]) == 0
    assert "nothing to download" in capsys.readouterr().out


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}])
def test_download_without_a_hub_fails_clearly(tmp_path: Path, env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "servers.download_models", "layout=h100_1",
                        "services=[planner]"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HOME": str(tmp_path), **env})
    assert r.returncode == 1
    assert "Qwen/Qwen3-VL-8B-Instruct-FP8" in r.stderr
    assert ("HF_HUB_OFFLINE is set" in r.stderr) or ("unreachable" in r.stderr)
    assert "Traceback" not in r.stderr
    assert not any(tmp_path.rglob("*.safetensors"))


def test_download_without_huggingface_hub(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(download_models.DownloadError, match="pip install huggingface_hub"):
        download_models.download([download_models.Download("planner", "Qwen/x")])


@pytest.mark.parametrize(("layout", "verifier", "room"), [
    ("h100_1", "qwen3vl_32b_thinking", 4096), ("mi325x_4", "qwen3vl_32b_thinking", 4096),
    # the CPU configs send images of at most 1024 px: ~1k visual tokens each
    ("cpu_qwen3vl_2b", "qwen3vl_2b_thinking", 2048)])
def test_the_verifier_server_has_room_for_the_verifier_config(layout: str, verifier: str,
                                                              room: int) -> None:
    """The verifier asks for max_tokens (the 32B's from its model card, 40960); a server whose
    --max-model-len leaves no room for the prompt on top refuses every verification."""
    from hydra import compose, initialize_config_dir

    from servers.launch import CONF_DIR

    (spec,) = [s for s in resolve_specs(LaunchArgs(layout=layout)) if s.name == "verifier"]
    max_model_len = int(spec.argv[spec.argv.index("--max-model-len") + 1])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"verifier={verifier}"])
    assert max_model_len >= cfg.verifier.sampling.max_tokens + room  # 2 views + the question


def test_the_cpu_experiment_talks_to_the_cpu_layout() -> None:
    """`experiment=infer_cpu` reaches what `layout=cpu_qwen3vl_2b action=start` serves: the
    served names, the ports (a port override given to both commands moves both), a prompt mode
    the classical backend serves, images small enough for the servers' --max-model-len."""
    from hydra import compose, initialize_config_dir

    from servers.launch import CONF_DIR

    moved = "layout.services.verifier.port=9100"
    specs = {s.name: s for s in resolve_specs(LaunchArgs(layout="cpu_qwen3vl_2b",
                                                         overrides=(moved,)))}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=infer_cpu", moved])
    assert cfg.mode == "infer" and cfg.executor.prompt_mode in ("box", "box_points")
    assert specs["executor"].backend == "classical"
    for role in ("planner", "verifier"):
        model = cfg[role]
        assert model.model == specs[role].served_model_name, role
        assert model.base_url == specs[role].base_url + "/v1", role
        assert model.image.max_side <= 1024, role
    assert cfg.verifier.base_url == "http://127.0.0.1:9100/v1"
    assert cfg.executor.base_url == specs["executor"].base_url
    views = len(cfg.verifier.overlay.views)
    (limit,) = [json.loads(s.argv[s.argv.index("--limit-mm-per-prompt") + 1])["image"]
                for s in specs.values() if s.name == "verifier"]
    assert views <= limit
