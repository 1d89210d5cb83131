"""A whole experiment over HTTP, as a user runs it: `python run.py` with the real clients, the real
SAM server (classical backend, its own process) and the vLLM stand-in; then single-image
inference (`mode=infer`) against the same servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from sam_harness import running_server
from standin import PlannerScript, ServerThread, StandIn, Targets, VerifierScript
from standin import overlay_iou_judge as iou_judge

from rescue.metrics import iou, iou_counts

ROOT = Path(__file__).resolve().parents[1]
PLANNER, VERIFIER = "Qwen3-VL-8B-Instruct", "Qwen3-VL-32B-Thinking"
MODELS = ["experiment=http_synthetic", "dataset.num_samples=4", "seed=0",
          # lossless images let the stand-in find each sample by its pixel digest, and the
          # [overlay, image] views let its judge see exactly which pixels are marked
          "planner.image.format=png", "verifier.image.format=png",
          "verifier.overlay.views=[overlay,image]",
          # the classical server stands in for SAM3 and reads no text: the interactive mode
          "executor.prompt_mode=box_points"]
RUN = ["max_n=8", "n_grid=[1,2,4,8]", "selection.bootstrap=0", "report.overlays=1",
       "logger=none", "pipeline.progress=false"]

pytestmark = pytest.mark.slow


def load_samples(overrides=MODELS):
    """The run's synthetic samples, as the stand-in's script needs them (benchmarks too)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    ds = instantiate(cfg.dataset)
    return [ds.load(i) for i in ds.sample_ids()]


@pytest.fixture(scope="module")
def samples():
    return load_samples()


@pytest.fixture(scope="module")
def servers(samples, tmp_path_factory):
    targets = Targets(samples)
    standin = StandIn({PLANNER: PlannerScript(targets, p_broken=0.3),
                       VERIFIER: VerifierScript(iou_judge(targets))})
    vllm = ServerThread(standin.app()).start()
    try:
        with running_server(tmp_path_factory.mktemp("sam")) as sam:
            yield standin, vllm.url + "/v1", sam.url
    finally:
        vllm.stop()


def _launch(tmp_path, servers, name, *extra, experiment="http_synthetic", down=False,
            cache="cache"):
    _, api, sam_url = servers
    if down:  # every endpoint unreachable: nothing listens on port 1
        api, sam_url = "http://127.0.0.1:1/v1", "http://127.0.0.1:1"
    env = {**os.environ, "PLANNER_API_BASE": api, "VERIFIER_API_BASE": api,
           "EXECUTOR_API_BASE": sam_url, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / name}",
           f"paths.cache_dir={tmp_path / cache}", f"experiment={experiment}", *MODELS[1:],
           *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _run(tmp_path, servers, name, *extra, **kw):
    proc = _launch(tmp_path, servers, name, *extra, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path / name


def _sam_requests(sam_url):
    return httpx.get(sam_url + "/v1/info", timeout=10).json()["stats"]["requests"]


def test_experiment_over_http_then_offline_then_single_image(tmp_path, servers, samples):
    standin, _, sam_url = servers
    sam_before = _sam_requests(sam_url)
    run_dir = _run(tmp_path, servers, "online", *RUN)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["simulated"] is False
    calls = stats["calls"]
    # one planner request per sample (8 hypotheses: n=8), one executor request per sample,
    # one verifier request per distinct non-empty mask
    assert calls["requests"]["plan"] == len(samples)
    # before any work, each chat endpoint got one probe: the run's own request, max_tokens=1
    # (a two-step verdict's continuation is max_tokens=1 too, continuing an assistant message)
    def probe(body):
        return body["max_tokens"] == 1 and not body.get("continue_final_message")

    probes = {role: [b for b in standin.chat_requests(model) if probe(b)]
              for role, model in (("planner", PLANNER), ("verifier", VERIFIER))}
    assert [len(p) for p in probes.values()] == [1, 1]
    work = {role: [b for b in standin.chat_requests(model) if not probe(b)]
            for role, model in (("planner", PLANNER), ("verifier", VERIFIER))}
    continued = [b for b in work["verifier"] if b.get("continue_final_message")]
    assert continued and all(b["max_tokens"] == 1 and b["messages"][-1]["role"] == "assistant"
                             for b in continued)  # the default verdict: logprobs_at=answer
    assert all(not b.get("logprobs") for b in work["verifier"] if b not in continued)
    def same(body):  # n: the probe asks for a full request (16), this run's max_n is 8
        return {k: v for k, v in body.items() if k not in ("max_tokens", "n")}

    assert same(probes["planner"][0]) in [same(b) for b in work["planner"]]
    assert len(work["planner"]) == len(samples)
    assert all(b["n"] == 8 and b["seed"] == 0 for b in work["planner"])
    assert calls["requests"]["execute"] == len(samples)
    assert _sam_requests(sam_url) - sam_before == len(samples)
    assert len(work["verifier"]) - len(continued) <= calls["requests"]["verify"]
    # every HTTP request of the work is counted per endpoint in stats.json (no faults here:
    # no retries); the probes are the preflight's, outside the counters
    endpoints = stats["endpoints"]
    assert endpoints["planner"]["requests"] == len(work["planner"])
    assert endpoints["verifier"]["requests"] == len(work["verifier"])
    assert endpoints["planner"]["retries"] == endpoints["verifier"]["retries"] == 0
    records = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(samples)
    cands = [c for r in records for c in r["candidates"]]
    assert len(cands) == 8 * len(samples)
    assert any(c["failed_stage"] == "plan" for c in cands)  # p_broken: recorded, not fatal
    assert sum(c["verifier_source"] == "logprobs" for c in cands) > len(cands) // 2
    m = pd.read_csv(run_dir / "metrics.csv")
    at8 = m[(m.n == 8) & (m.estimator == "best_of_n") & (m.subset == "all")].set_index(
        "selector").giou
    assert at8["verifier"] >= at8["random"]  # the stand-in judge scores by true IoU
    assert at8["oracle"] >= at8["verifier"]

    chat_before = len(standin.chat_requests())
    sam_mid = _sam_requests(sam_url)
    again = _run(tmp_path, servers, "offline", *RUN, "offline=true")
    assert json.loads((again / "stats.json").read_text())["calls"]["model_calls"] == 0
    assert len(standin.chat_requests()) == chat_before and _sam_requests(sam_url) == sam_mid
    assert (again / "records.jsonl").read_text() == (run_dir / "records.jsonl").read_text()
    # offline needs no server: the SAM server's identity was recorded beside the cache
    down = _run(tmp_path, servers, "down", *RUN, "offline=true", down=True)
    assert (down / "records.jsonl").read_text() == (run_dir / "records.jsonl").read_text()
    # ... and where none was recorded, the error names that cause, not a cache miss
    (tmp_path / "bare").mkdir()
    bare = _launch(tmp_path, servers, "bare", *RUN, "offline=true", down=True, cache="bare")
    assert bare.returncode != 0
    last = bare.stderr.strip().splitlines()[-1]  # the one line (HYDRA_FULL_ERROR adds a trace)
    assert last.startswith("rescue: the identity of a model") and "has no entry" not in last
    assert "executor_info.json records no identity" in last

    # single-image inference on one of the samples: it shares the cache with the run above
    # (same image pixels, query and models), so it costs no model call and must pick the
    # candidate the run's verifier selector picked
    sample = samples[1]
    image = tmp_path / "photo.png"
    Image.fromarray(sample.image).save(image)
    chat_before = len(standin.chat_requests())
    out = _run(tmp_path, servers, "infer", f"image={image}", f"query={sample.query}",
               "max_n=8", "n_grid=[1,2,4,8]", experiment="infer")
    assert len(standin.chat_requests()) == chat_before
    result = json.loads((out / "candidates.json").read_text())
    assert result["query"] == sample.query and len(result["candidates"]) == 8
    assert [c["rank"] for c in result["candidates"]] == list(range(8))
    assert result["selected"] == result["candidates"][0]["index"]
    (rec,) = [r for r in records if r["sample_id"] == sample.sample_id]
    ok = [c for c in rec["candidates"] if c["failed_stage"] is None]
    best = max(ok, key=lambda c: (c["verifier_score"], -c["index"]))
    assert result["selected"] == best["index"]
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    assert mask.shape == sample.gt.shape
    assert iou(*iou_counts(mask, sample.gt)) == pytest.approx(best["iou"])
    assert (out / "overlay.png").is_file() and (out / "candidates.png").is_file()
    # drawn for people: a tint and a haloed outline chosen from the image, not a fixed red
    from rescue.models.views import draw_contrasting
    np.testing.assert_array_equal(np.asarray(Image.open(out / "overlay.png")),
                                  draw_contrasting(sample.image, mask))


def test_a_server_refusing_every_verification_stops_the_run_with_one_line(tmp_path, servers,
                                                                           samples):
    """top_logprobs above the server's --max-logprobs: every verification is a 400. Even with
    the preflight probe off, the run must stop non-zero naming the cause, not exit 0 with gIoU
    numbers."""
    _, api, sam_url = servers
    strict = StandIn({PLANNER: PlannerScript(Targets(samples)),
                      VERIFIER: VerifierScript(iou_judge(Targets(samples)))}, max_logprobs=5)
    with ServerThread(strict.app()) as srv:
        env = {**os.environ, "PLANNER_API_BASE": api, "VERIFIER_API_BASE": srv.url + "/v1",
               "EXECUTOR_API_BASE": sam_url, "WANDB_MODE": "disabled"}
        cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
               f"paths.cache_dir={tmp_path / 'cache'}", *MODELS, *RUN,
               "pipeline.abort.min_calls=4", "pipeline.probe=false"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rescue: run stopped: verify:") and "request:rejected" in last
    assert "max allowed: 5" in last
    assert not (tmp_path / "run" / "metrics.csv").exists()
    # nothing done is lost: the file is there from the start (empty when the stop came before
    # any sample finished) and holds whole records only
    partial = (tmp_path / "run" / "records.partial.jsonl").read_text().splitlines()
    assert all(json.loads(line)["sample_id"] for line in partial)
