"""SAM3 prompt modes as an ablation axis: the mode re-keys execution only, so a sweep over
`executor.prompt_mode` re-executes cached plans without a planner call."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from standin import ServerThread

from rescue.cache import Cache
from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import Prompt
from rescue.models.sam_client import SamClient
from rescue.models.simulated import SimulatedPlanner, SimulatedVerifier
from rescue.pipeline import Pipeline
from servers.backends import make_backend
from servers.sam_server import ServerSettings, create_app

ROOT = Path(__file__).resolve().parents[1]
CLASSICAL_INFO = {"protocol": 1, "backend": "classical", "model": "grabcut",
                  "identity": {"backend": "classical"}}


@pytest.fixture(scope="module")
def sam_url():
    srv = ServerThread(create_app(make_backend("classical", {}), ServerSettings())).start()
    yield srv.url
    srv.stop()


def _pipeline(cache: Cache, executor) -> Pipeline:
    # every hypothesis carries a point: box and box_points send different prompts
    return Pipeline(SimulatedPlanner(p_point=1.0, p_invalid=0.0), executor,
                    SimulatedVerifier(), cache, max_n=4, progress=False)


def test_the_mode_changes_the_execute_key_and_never_the_plan_key(tmp_path):
    ds = SyntheticDataset(num_samples=1, seed=3, height=64, width=80)
    sample = ds.load(ds.sample_ids()[0])
    prompt = Prompt(text="cup", box=(1, 2, 30, 40), points=((10, 20),), point_labels=(1,))
    pipes = {m: _pipeline(Cache(tmp_path), SamClient("http://127.0.0.1:1", prompt_mode=m,
                                                     info=CLASSICAL_INFO))
             for m in ("text", "text_box", "box", "box_points")}
    plan_keys = {p.plan_key(sample, 0) for p in pipes.values()}
    execute_keys = {p.execute_key(sample, prompt) for p in pipes.values()}
    verify_keys = {p.verify_key(sample, "mask-digest") for p in pipes.values()}
    assert len(plan_keys) == 1 and len(verify_keys) == 1  # a mask is judged alike in any mode
    assert len(execute_keys) == 4


def test_a_second_mode_reexecutes_the_cached_plans_without_a_planner_call(tmp_path, sam_url):
    ds = SyntheticDataset(num_samples=3, seed=5, height=96, width=128, difficulty="easy")
    ids = ds.sample_ids()

    def run(mode: str):
        pipe = _pipeline(Cache(tmp_path / "cache"), SamClient(
            sam_url, prompt_mode=mode, retry={"attempts": 2, "base_delay_s": 0.01}))
        assert asyncio.run(pipe.executor.preflight()) == []
        records = asyncio.run(pipe.run(ds, ids))
        asyncio.run(pipe.executor.aclose())
        return pipe.stats, records

    first, rec_box = run("box")
    assert first.requests["plan"] > 0 and first.requests["execute"] > 0
    second, rec_points = run("box_points")
    assert second.requests.get("plan", 0) == 0  # zero planner calls ...
    assert second.cached["plan"] == len(ids) * 4  # ... every hypothesis read back ...
    assert second.requests["execute"] == first.requests["execute"]  # ... all re-executed
    assert second.cached.get("execute", 0) == 0
    def hypotheses(records):
        return [[(c.text, c.box, c.points) for c in r.candidates] for r in records]

    assert hypotheses(rec_box) == hypotheses(rec_points)  # the same plans, other masks
    assert any(c.points for r in rec_points for c in r.candidates)
    assert all(c.failed_stage is None for r in rec_points for c in r.candidates)
    assert [[c.mask_key for c in r.candidates] for r in rec_box] != \
        [[c.mask_key for c in r.candidates] for r in rec_points]
    again, _ = run("box_points")  # the same mode again: everything from the cache
    assert again.model_calls == 0


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # outside a Hydra run no runtime cwd exists to resolve paths.* against
        return compose(config_name="config",
                       overrides=[f"paths.root_dir={ROOT}", *overrides])


def test_the_experiment_composes_with_each_mode_and_defaults_to_text_box():
    cfg = _compose(["experiment=sam3_prompt_modes"])
    assert cfg.executor.prompt_mode == "text_box" and cfg.task_name == "sam3_prompt_modes"
    assert "reasonseg" in cfg.dataset._target_.lower()
    for mode in ("text", "text_box", "box", "box_points"):
        client = instantiate(_compose(["experiment=sam3_prompt_modes",
                                       f"executor.prompt_mode={mode}"]).executor)
        assert client.prompt_mode == mode
    with pytest.raises(Exception, match=r"executor\.prompt_mode must be one of"):
        instantiate(_compose(["experiment=sam3_prompt_modes",
                              "executor.prompt_mode=points"]).executor)


def test_the_study_script_sweeps_the_four_modes(tmp_path):
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/bash\n(IFS=$'\\x1f'; echo \"$*\") >> {shlex.quote(str(log))}\n")
    stub.chmod(0o755)
    out = tmp_path / "study out"
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "sam3_prompt_modes.sh"), str(out),
                           "subset.limit=20"], env={**os.environ, "PYTHON": str(stub)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [line.split("\x1f") for line in log.read_text().splitlines()]
    assert calls == [
        ["run.py", "-m", "experiment=sam3_prompt_modes",
         "executor.prompt_mode=text,text_box,box,box_points", "logger.group=sam3_prompt_modes",
         f"hydra.sweep.dir={out}", "subset.limit=20"],
        ["-m", "analysis.compare", str(out), "--out", str(out), "--selector", "verifier"],
        ["-m", "analysis.compare", str(out), "--out", f"{out}/ciou", "--selector", "verifier",
         "--metric", "ciou"],
    ]


@pytest.mark.slow
def test_a_hydra_multirun_over_the_mode_plans_once(tmp_path, sam_url):
    """The ablation's mechanism, on CPU: the demo's simulated planner and verifier with the SAM
    client against a classical server, `executor.prompt_mode=box,box_points` as one multirun."""
    env = {**os.environ, "EXECUTOR_API_BASE": sam_url, "WANDB_MODE": "disabled",
           "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "run.py", "-m", "experiment=demo", "executor=sam3",
           "executor.prompt_mode=box,box_points", "planner.p_point=1.0",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}",
           "dataset.num_samples=4", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=0",
           "report.overlays=0", "report.plot=false", "logger=none", "pipeline.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = [json.loads((tmp_path / "sweep" / j / "stats.json").read_text()) for j in "01"]
    modes = [s["models"]["executor"]["prompt_mode"] for s in stats]
    assert modes == ["box", "box_points"]
    calls = [s["calls"] for s in stats]
    assert calls[0]["requests"]["plan"] > 0
    assert calls[1]["requests"].get("plan", 0) == 0 and calls[1]["cached"]["plan"] == 4 * 4
    assert calls[1]["requests"]["execute"] > 0 and calls[1]["cached"].get("execute", 0) == 0
