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

    # the arena's and listwise's cost columns: at N = max_n, prefix, every call the run made,
    # and their tokens are the stage totals of stats.json (no double count)
    for variant, stage, selector, calls_of in (
            ("pairwise", "compare", "arena", lambda r: len(r.comparisons)),
            ("listwise", "choose", "listwise", None)):
        metrics = pd.read_csv(out / variant / "metrics.csv")
        rows = metrics[(metrics.selector == selector) & (metrics.subset == "all")]
        assert rows[["verify_masks", "verify_calls", "verify_tokens"]].notna().all().all()
        one = rows.n == 1  # one candidate: nothing to compare or choose among
        assert (rows[one].verify_calls == 0).all() and (rows[one].verify_tokens == 0).all()
        assert rows[~one].verify_calls.gt(0).all() and rows[~one].verify_tokens.gt(0).all()
        assert rows.sort_values("n").groupby("estimator").verify_calls.apply(
            lambda c: c.is_monotonic_increasing).all()
        recs = list(read(out / variant / "records.jsonl"))
        if calls_of is not None:
            whole = rows[(rows.estimator == "prefix") & (rows.n == 4)].iloc[0]
            assert whole.verify_calls == pytest.approx(sum(map(calls_of, recs)) / len(recs))
            spent = json.loads((out / variant / "stats.json").read_text())["calls"]["cost"][stage]
            tokens = spent.get("prompt_tokens", 0) + spent.get("completion_tokens", 0)
            assert whole.verify_tokens * len(recs) == pytest.approx(tokens)
