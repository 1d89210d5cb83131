"""The progress display (issue 11): its total is known up front, and without a TTY it writes a
bounded number of plain lines, never redraw escapes."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

from rescue.progress import StageBars

ROOT = Path(__file__).resolve().parents[1]


def test_the_total_is_the_samples_and_the_work_is_counted_beside_it(caplog):
    bars = StageBars(enabled=True, samples=4, stream=io.StringIO(), tty=False, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="rescue"):
        bars.update("plan", 16)
        bars.grow("execute", 12)
        bars.update("execute", 5)
        bars.sample_done()
        bars.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("progress: 1/4 samples (25%)")
    assert "plan 16 hyp | execute 5/12 prompt" in lines[-1] and "ETA" in lines[-1]
    assert len(lines) == 4  # every_s=0: one line per event, and the last


def test_on_a_terminal_it_is_one_bar_of_samples():
    out = io.StringIO()
    bars = StageBars(enabled=True, samples=3, stream=out, tty=True)
    for _ in range(3):
        bars.update("verify", 2)
        bars.sample_done()
    bars.close()
    text = out.getvalue()
    assert "samples" in text and "3/3" in text and "verify 6 mask" in text


def test_disabled_it_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="rescue"):
        bars = StageBars(enabled=False, samples=3, stream=io.StringIO(), tty=True)
        bars.update("plan", 1)
        bars.sample_done()
        bars.close()
    assert not caplog.records


def test_a_run_without_a_tty_writes_a_calm_log(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}", "logger=none",
                           "dataset.num_samples=12", "report.overlays=0",
                           "selection.bootstrap=20"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "\r" not in text and "\x1b[" not in text
    assert "progress: 12/12 samples (100%)" in text
    assert len(text.splitlines()) <= 20, text
