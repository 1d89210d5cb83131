"""A run keeps its truth and masks beside its records: a copied run directory re-evaluates alone.

`mode=evaluate` on a copy, with the run's own directory, its cache and (for the synthetic demo,
generated from the seed) any dataset out of reach, gives the run's metrics.csv byte for byte,
aggregators included: they read the pixels from the copy's masks.jsonl.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.rescore import rescore_run
from rescue import truth
from rescue.records import read

ROOT = Path(__file__).resolve().parents[1]
AGG = "selection.aggregators=[vote_best,vote_majority,verifier_fusion,agent_accept]"
SMALL = ["dataset.num_samples=6", "max_n=6", "n_grid=[1,2,6]", "selection.bootstrap=50",
         "report.overlays=0", "report.plot=false", "pipeline.progress=false", "logger=none",
         "selection.aggregation.draws=8", AGG]

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *SMALL, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"HYDRA_FULL_ERROR": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})


def test_evaluate_on_a_copied_run_reproduces_metrics_without_dataset_or_cache(tmp_path):
    made = _run(tmp_path, f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.cache_dir={tmp_path / 'cache'}")
    assert made.returncode == 0, made.stderr[-3000:]
    run = tmp_path / "run"
    recs = list(read(run / "records.jsonl"))
    stored = truth.load(run / "masks.jsonl")
    assert set(stored) == {r.sample_id for r in recs}
    assert all(set(r.masks) <= set(stored[r.sample_id].masks) for r in recs)
    want = (run / "metrics.csv").read_bytes()
    assert b"vote_majority" in want and b"agent_accept" in want
    # the analysis tools re-evaluate the aggregators from the same stored masks
    rescored = rescore_run(run, {"verifier": 1.0, "consensus": 0.5}, out_dir=tmp_path / "re",
                           plot=False)
    table = pd.read_csv(rescored["csv"])
    key = ["subset", "estimator", "selector", "n"]
    both = table.merge(pd.read_csv(run / "metrics.csv"), on=key, suffixes=("", "_run"))
    assert {"vote_best", "agent_accept"} <= set(both.selector)
    pd.testing.assert_series_equal(both.giou, both.giou_run, check_names=False)

    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    shutil.rmtree(tmp_path / "cache")
    again = _run(tmp_path, "mode=evaluate", f"records_from={copy}",
                 f"hydra.run.dir={tmp_path / 'evaluated'}",
                 f"paths.cache_dir={tmp_path / 'absent_cache'}",
                 )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "evaluated" / "metrics.csv").read_bytes() == want
    assert not (tmp_path / "absent_cache").exists()

    (copy / "masks.jsonl").unlink()
    missing = _run(tmp_path, "mode=evaluate", f"records_from={copy}",
                   f"hydra.run.dir={tmp_path / 'evaluated2'}")
    assert missing.returncode != 0 and "masks.jsonl" in missing.stderr
