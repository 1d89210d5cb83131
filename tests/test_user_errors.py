"""A newcomer's mistakes end in one line (issue 11): no traceback, the error in the run's log, a
FAILED run directory that analysis skips; every check before any model call or data scan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rescue.run_dir import NoRunsError, RunDir, find_runs
from rescue.settings import EvaluationSettings, default_n_grid

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["logger=none", "pipeline.progress=false", "dataset.num_samples=4", "max_n=4",
         "selection.bootstrap=20", "report.overlays=0"]


def _run(tmp_path: Path, name: str, *overrides: str, full_error: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled")
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={out}",
                           f"paths.cache_dir={tmp_path / 'cache'}", *QUICK, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.parametrize(("overrides", "says"), [
    (["max_n=-3"], "max_n must be an integer >= 1"),
    (["n_grid=[]"], "n_grid must hold integers >= 1"),
    (["n_grid=[1,8]"], "n_grid values [8] are outside 1..max_n=4"),
    (["mode=evaluate"], "mode=evaluate needs records_from=<run dir>"),
    (["mode=evaluate", "records_from=/nonexistent/run"], "holds no records"),
    (["mode=bogus"], "unknown mode='bogus'; valid modes: run, evaluate, infer, merge"),
    (["selection.selectors=[nope]"], "unknown selector 'nope'"),
    (["planner=qwen3vl_8b_instruct", "planner.coords=bogus"],
     "cannot build planner from its config: ValueError: planner.coords must be one of"),
])
def test_a_user_error_is_one_line_in_the_console_and_the_log(tmp_path, overrides, says):
    proc, out = _run(tmp_path, "bad", *overrides)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("rescue: ") and says in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert says in (out / "run.log").read_text()
    # nothing was scanned or called: the data is never listed
    assert "samples selected" not in proc.stdout + proc.stderr
    assert RunDir(out).failed() and says in RunDir(out).failed_file.read_text()
    with pytest.raises(NoRunsError):
        find_runs(out)


def test_full_error_keeps_the_traceback_and_the_line(tmp_path):
    proc, _ = _run(tmp_path, "bad", "max_n=0", full_error=True)
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("rescue: max_n must be")


def test_analysis_skips_a_failed_run_beside_good_ones(tmp_path):
    _run(tmp_path / "study", "0", "max_n=-1")
    good, out = _run(tmp_path / "study", "1")
    assert good.returncode == 0, good.stderr[-2000:]
    assert find_runs(tmp_path / "study") == [out.resolve()]


def test_evaluate_prints_the_same_closing_block_as_run(tmp_path):
    first, src = _run(tmp_path, "src")
    assert first.returncode == 0, first.stderr[-2000:]
    proc, out = _run(tmp_path, "ev", "mode=evaluate", f"records_from={src}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    for line in ("gIoU% (best-of-N, SIMULATED models): verifier @1:", "failed: plan"):
        assert line in text and line in first.stdout + first.stderr
    assert f"outputs in {out}" in text and f"outputs in {src}" in first.stdout + first.stderr
    assert "re-evaluating 4 samples of" in text


@pytest.mark.parametrize("max_n", list(range(1, 130)))
def test_the_default_n_grid_is_the_powers_of_two_and_max_n(max_n):
    want = sorted({n for n in range(1, max_n + 1) if n & (n - 1) == 0} | {max_n})
    assert list(default_n_grid(max_n)) == want
    settings = EvaluationSettings.from_config({"max_n": max_n, "n_grid": None})
    assert list(settings.n_grid) == want


def test_n_grid_follows_max_n_through_the_composed_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for overrides, grid in ((["max_n=32"], (1, 2, 4, 8, 16, 32)), (["max_n=8"], (1, 2, 4, 8)),
                                (["experiment=reasonseg_multi_n"], (1, 2, 4, 8, 16, 32, 64)),
                                (["max_n=8", "n_grid=[1,3]"], (1, 3))):
            cfg = compose(config_name="config", overrides=overrides)
            assert EvaluationSettings.from_config(cfg).n_grid == grid, overrides


def test_help_lists_the_modes_every_experiment_and_examples():
    proc = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    from rescue.app import MODES

    for mode in MODES:
        assert any(ln.startswith(f"  {mode} ") for ln in lines), mode
    section = lines[lines.index("Experiments (experiment=):") + 1:lines.index("Common overrides:")]
    listed = sorted(ln.split()[0] for ln in section if ln.strip())
    assert listed == sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert sum(ln.startswith("  python run.py") for ln in lines) >= 3
    assert len(lines) < 70  # not the config dump
