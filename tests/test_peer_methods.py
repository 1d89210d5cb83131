"""experiments/peer_methods.sh on a shrunk CPU demo: four runs on one cache, one table and one
figure with every aggregator and verifier variant; the variants call only their verifier."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from rescue import arena
from rescue.records import read

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset.num_samples=4", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=20",
         "report.overlays=0", "report.plot=false", "pipeline.progress=false", "logger=none"]
METHODS = {"verifier", "executor", "consensus", "first", "random", "oracle", "vote_best",
           "vote_majority", "verifier_fusion", "agent_accept", "arena", "listwise"}

pytestmark = pytest.mark.slow


def test_the_study_puts_every_method_in_one_table_and_figure(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "peer_methods.sh"), str(out),
                           f"paths.cache_dir={tmp_path / 'cache'}", *SMALL], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "peer_methods.csv")
    assert set(table.selector) == METHODS
    assert (out / "peer_methods_iou_vs_n.png").stat().st_size > 0
    md = (out / "peer_methods.md").read_text()
    assert "SIMULATED" in md and all(f"| {m} |" in md for m in METHODS)
    assert table.simulated.all()  # every table says simulated, on every row
    for variant, stage in (("accept", "verify"), ("pairwise", "compare"),
                           ("listwise", "choose")):
        req = json.loads((out / variant / "stats.json").read_text())["calls"]["requests"]
        assert req.get("plan", 0) == req.get("execute", 0) == 0, variant
        assert set(req) == {stage} and req[stage] > 0, variant
    recs = list(read(out / "pairwise" / "records.jsonl"))
    sent = sum(len(arena.pairs_to_compare(pd.DataFrame(r.mask_iou).to_numpy())) for r in recs)
    row = table[table.selector == "arena"].iloc[0]
    assert row.verifier_calls == sent == sum(len(r.comparisons) for r in recs)
    assert row.planner_executor_calls == 0
    pointwise = table[table.selector == "verifier"].iloc[0]
    assert row.verifier_tokens > pointwise.verifier_tokens > 0  # both orders of every pair
    free = table[table.selector.isin(["vote_best", "consensus", "oracle"])]
    assert (free.verifier_calls == 0).all() and (free.verifier_tokens == 0).all()
