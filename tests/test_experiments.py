"""The study scripts: the CPU one for real (a shrunk Hydra multirun), the GPU ones' commands."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SHRINK = ["dataset.num_samples=6", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=50",
          "report.overlays=1", "pipeline.progress=false"]


def _bash(script: str, *args: str, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(EXPERIMENTS / script), *args], cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_demo_noise_sweep_runs_three_jobs_and_the_study(tmp_path):
    out = tmp_path / "sweep"
    # from another directory, with a relative output path: the script resolves it first
    proc = _bash("demo_noise_sweep.sh", "sweep", f"paths.cache_dir={tmp_path / 'cache'}",
                 *SHRINK, env={"WANDB_MODE": "disabled", "WANDB_SILENT": "true"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(p.name for p in out.iterdir() if (p / "metrics.csv").is_file())
    assert runs == ["0", "1", "2"]
    noises = [(out / r / ".hydra" / "overrides.yaml").read_text() for r in runs]
    for r, noise in zip(runs, ("0.1", "0.3", "0.6"), strict=True):
        assert f"verifier.noise={noise}" in noises[int(r)]
        assert "logger.group=demo_noise" in noises[int(r)]
    for name in ("study.csv", "study.md", "study_iou_vs_n.png"):
        assert (out / name).is_file(), name
    study = pd.read_csv(out / "study.csv")
    assert sorted(study["verifier.noise"].unique()) == [0.1, 0.3, 0.6]
    assert set(study["n"]) == {1, 2, 4}
    md = (out / "study.md").read_text()
    assert "SIMULATED" in md
    for noise in ("0.1", "0.3", "0.6"):
        assert f"`verifier.noise={noise}`" in md
    # the jobs share hypotheses and masks: only the first one plans
    calls = [json.loads((out / r / "stats.json").read_text())["calls"] for r in runs]
    plans = [c["requests"].get("plan", 0) for c in calls]
    assert plans[0] > 0 and plans[1] == plans[2] == 0
    assert calls[1]["cached"]["plan"] == calls[2]["cached"]["plan"] == 6 * 4


def test_demo_noise_sweep_without_a_logger_and_without_args(tmp_path):
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n')
    stub.chmod(0o755)
    proc = _bash("demo_noise_sweep.sh", str(tmp_path / "o"), "logger=none",
                 env={"PYTHON": str(stub)})
    assert proc.returncode == 0, proc.stderr
    sweep = log.read_text().splitlines()[0]
    assert "logger=none" in sweep and "logger.group" not in sweep
    missing = _bash("demo_noise_sweep.sh", env={"PYTHON": str(stub)})
    assert missing.returncode != 0 and "usage" in missing.stderr


@pytest.mark.parametrize("script, expected", [
    ("verifier_ablation.sh", [
        ["run.py", "-m", "experiment=reasonseg_multi_n",
         "verifier=qwen3vl_32b_thinking,qwen3vl_32b_thinking_rating,qwen3vl_8b_instruct",
         "logger.group=verifier_ablation", "hydra.sweep.dir={out}", "{extra}"],
        ["-m", "analysis.compare", "{out}", "--out", "{out}", "--selector", "verifier"],
        ["-m", "analysis.compare", "{out}", "--out", "{out}/ciou", "--selector", "verifier",
         "--metric", "ciou"],
    ]),
    ("scaling_max_n.sh", [
        ["run.py", "experiment=refcoco_multi_n", "subset.fraction=0.1", "max_n=64",
         "logger.group=scaling_max_n", "hydra.run.dir={out}/generate", "{extra}"],
        ["run.py", "mode=evaluate", "experiment=refcoco_multi_n", "subset.fraction=0.1",
         "max_n=64", "records_from={out}/generate", "n_grid=[1,2,3,4,6,8,12,16,24,32,48,64]",
         "selection.bootstrap=5000", "hydra.run.dir={out}/dense", "{extra}"],
        ["run.py", "-m", "experiment=refcoco_multi_n", "subset.fraction=0.1", "offline=true",
         "max_n=8,16,32,64", "n_grid=[1,2,4,8]", "logger.group=scaling_max_n",
         "hydra.sweep.dir={out}/pools", "{extra}"],
        ["-m", "analysis.compare", "{out}/pools", "--out", "{out}/pools", "--selector",
         "verifier"],
    ]),
])
def test_gpu_study_commands(tmp_path, script, expected):
    """The exact chain of commands (the GPU runs themselves are not run here)."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    # one line per call, arguments separated by a unit separator (they may hold spaces)
    stub.write_text(f"#!/bin/bash\n(IFS=$'\\x1f'; echo \"$*\") >> {shlex.quote(str(log))}\n")
    stub.chmod(0o755)
    out = tmp_path / "study out"
    extra = "dataset.root=/data/x y"
    proc = _bash(script, str(out), extra, env={"PYTHON": str(stub)})
    assert proc.returncode == 0, proc.stderr
    calls = [line.split("\x1f") for line in log.read_text().splitlines()]
    want = [[a.replace("{out}", str(out)).replace("{extra}", extra) for a in cmd]
            for cmd in expected]
    assert calls == want
    assert out.is_dir()


def test_scripts_are_strict_and_relocatable():
    preamble = EXPERIMENTS / "study.sh"
    assert "set -euo pipefail" in preamble.read_text()
    studies = sorted(set(EXPERIMENTS.glob("*.sh")) - {preamble})
    assert studies
    for script in studies:
        text = script.read_text()
        assert "set -euo pipefail" in text, script.name
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/study.sh"' in text, script.name
        assert '"$@"' in text, script.name
        assert "/work/" not in text and "/home/" not in text, script.name
        assert os.access(script, os.X_OK), script.name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script.name
    readme = (EXPERIMENTS / "README.md").read_text()
    for script in [preamble, *studies]:
        assert script.name in readme


@pytest.mark.slow
def test_compute_frontier_sweeps_verifier_by_max_n_and_prints_the_cheapest(tmp_path):
    out = tmp_path / "frontier"
    proc = _bash("compute_frontier.sh", str(out), f"paths.cache_dir={tmp_path / 'cache'}",
                 "dataset.num_samples=4", "selection.bootstrap=20", "report.overlays=1",
                 "pipeline.progress=false", "logger=none")
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(p.name for p in out.iterdir() if (p / "metrics.csv").is_file())
    assert runs == [str(k) for k in range(6)]
    study = pd.read_csv(out / "study.csv")
    assert sorted(study["max_n"].unique()) == [4, 8, 16]
    assert sorted(study["verifier.noise"].unique()) == [0.1, 0.3]
    assert study["total_tokens"].notna().all()
    assert "Cheapest configuration reaching X% of the best gIoU" in proc.stdout
    assert "Pareto frontier" in (out / "study_frontier.md").read_text()
    assert (out / "study_giou_frontier.png").read_bytes()[:4] == b"\x89PNG"
