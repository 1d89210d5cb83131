"""The demo end to end, as a user runs it: `python run.py ...` in a subprocess.

These are the issue's must-holds: a rerun with offline=true gives identical metrics with zero
model calls, and a run killed midway then resumed gives exactly the uninterrupted results.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset.num_samples=10", "max_n=8", "n_grid=[1,2,4,8]", "selection.bootstrap=200",
         "report.overlays=2", "pipeline.progress=false"]

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DIR": str(tmp_path), "HYDRA_FULL_ERROR": "1"}


def _cmd(tmp_path: Path, run: str, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "run.py", f"hydra.run.dir={tmp_path / run}",
            f"paths.cache_dir={tmp_path / cache}", *SMALL, *extra]


def run_demo(tmp_path: Path, run: str, cache: str = "cache", *extra: str) -> Path:
    proc = subprocess.run(_cmd(tmp_path, run, cache, *extra), cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path / run


def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "stats.json").read_text())


def test_demo_end_to_end_then_offline_rerun(tmp_path):
    first = run_demo(tmp_path, "first")
    for name in ("records.jsonl", "metrics.csv", "metrics.md", "iou_vs_n.png", "stats.json",
                 ".hydra/config.yaml"):
        assert (first / name).is_file(), name
    assert list((first / "overlays").glob("*.png"))
    metrics = pd.read_csv(first / "metrics.csv")
    assert set(metrics.selector) >= {"verifier", "executor", "consensus", "first", "random",
                                     "oracle"}
    assert set(metrics.n) == {1, 2, 4, 8}
    stats = _stats(first)
    assert stats["simulated"] is True and stats["calls"]["model_calls"] > 0
    records = [json.loads(line) for line in (first / "records.jsonl").read_text().splitlines()]
    assert len(records) == 10 and all(r["simulated"] for r in records)
    assert all(len(r["candidates"]) == 8 for r in records)

    # re-evaluation from the records alone, on another grid: N is bounded by the pools (8),
    # not by this command's max_n; N=3 is new, N=8 must agree with the run's own table
    rerun = run_demo(tmp_path, "evaluate", "no_cache_needed", "mode=evaluate",
                     f"records_from={first}", "max_n=4", "n_grid=[1,3,8]")
    evaluated = pd.read_csv(rerun / "metrics.csv")
    assert set(evaluated.n) == {1, 3, 8}
    key = ["subset", "estimator", "selector", "n"]
    both = evaluated.merge(metrics, on=key, suffixes=("", "_run"))
    assert len(both) == len(metrics[metrics.n.isin([1, 8])])
    pd.testing.assert_series_equal(both.giou, both.giou_run, check_names=False)

    again = run_demo(tmp_path, "again", "cache", "offline=true")
    assert _stats(again)["calls"]["model_calls"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(again / "metrics.csv"), metrics)
    assert (again / "records.jsonl").read_text() == (first / "records.jsonl").read_text()


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = run_demo(tmp_path, "reference", "cache_ref")
    proc = subprocess.Popen(_cmd(tmp_path, "killed", "cache_kill"), cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    partial = tmp_path / "killed" / "records.partial.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.csv").exists()

    resumed = run_demo(tmp_path, "resumed", "cache_kill")
    calls = _stats(resumed)["calls"]
    assert calls["cached"].get("plan", 0) >= 3 * 8  # finished samples were not planned again
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "metrics.csv"),
                                  pd.read_csv(reference / "metrics.csv"))
    assert (resumed / "records.jsonl").read_text() == (reference / "records.jsonl").read_text()


def test_a_cached_rerun_with_new_cost_rates_recosts_every_row_with_no_model_call(tmp_path):
    first = run_demo(tmp_path, "first")
    rates = ["cost.planner.gpu_s_per_token=0.001", "cost.planner.gpu_s_per_call=0.2",
             "cost.executor.gpu_s_per_prompt=0.05", "cost.verifier.gpu_s_per_token=0.004",
             "cost.verifier.gpu_s_per_call=0.1"]
    again = run_demo(tmp_path, "again", "cache", "offline=true", *rates)
    assert _stats(again)["calls"]["model_calls"] == 0
    a, b = pd.read_csv(first / "metrics.csv"), pd.read_csv(again / "metrics.csv")
    assert a.gpu_s.isna().all() and not b.gpu_s.isna().any()
    tokens = ["plan_tokens", "execute_prompts", "verify_masks", "verify_tokens", "total_tokens"]
    pd.testing.assert_frame_equal(a[tokens], b[tokens])
    assert (a.plan_tokens > 0).all()
    want = (0.001 * b.plan_tokens + 0.2 + 0.05 * b.execute_prompts + 0.004 * b.verify_tokens
            + 0.1 * b.verify_masks)
    assert b.gpu_s.to_numpy() == pytest.approx(want.to_numpy(), rel=1e-9)
    assert (b.gpu_s_lo <= b.gpu_s + 1e-9).all() and (b.gpu_s <= b.gpu_s_hi + 1e-9).all()
    # the stats of the study's calls are the same: what the cache holds was not spent again
    assert _stats(again)["calls"]["cost"] == _stats(first)["calls"]["cost"]
    assert _stats(again)["calls"]["cost_spent"] == {}


def test_a_logged_run_is_calm_without_a_tty(tmp_path):
    """As under SLURM or `> log`: progress on (the default), W&B offline and not silenced.
    The console stays a researcher's: periodic progress lines, not redraws; no HTTP lines; no
    W&B summary table of attribute/... keys; the final block names where the outputs are."""
    env = {k: v for k, v in _env(tmp_path).items() if k != "WANDB_SILENT"}
    cmd = [c for c in _cmd(tmp_path, "logged", "cache") if c != "pipeline.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    assert len(lines) < 80, out
    assert "\r" not in out and "\x1b[" not in out  # no redraw escapes in a log file
    assert not [ln for ln in lines if "HTTP Request" in ln]
    assert not [ln for ln in lines if ln.startswith("wandb:")]  # its banner, tips, summary
    assert [ln for ln in lines if "wandb sync" in ln]  # our line: where the run is, how to sync
    assert str(tmp_path / "logged") in out
