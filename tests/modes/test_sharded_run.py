"""A study run as shards by a real Hydra launcher, then merged, equals the unsharded run.

The shards share one cache; the unsharded run uses its own, so both generate every hypothesis,
mask and verdict (seeded models), and equality is not the cache echoing itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["experiment=demo", "logger=none", "dataset.num_samples=7", "max_n=4", "n_grid=[1,2,4]",
          "report.overlays=0", "pipeline.progress=false", "selection.bootstrap=50"]


def _run(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unsharded run, with its own cache."""
    tmp = tmp_path_factory.mktemp("single")
    _run([*COMMON, f"paths.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'run'}"],
         tmp / "run.log")
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "shards"), [("joblib_shards", 3), ("local", 2)])
def test_sharded_run_and_merge_equal_the_unsharded_run(tmp_path: Path, single: Path,
                                                       launcher: str, shards: int) -> None:
    _run(["-m", *COMMON, f"paths.cache_dir={tmp_path / 'cache_shared'}",
          f"hydra/launcher={launcher}", f"subset.num_shards={shards}",
          f"subset.shard=range({shards})", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
         tmp_path / "sweep.log")
    parts = [(tmp_path / "sweep" / str(s) / "records.jsonl").read_text().splitlines()
             for s in range(shards)]
    assert all(parts) and sum(len(p) for p in parts) == 7  # every shard did its share
    # the merge takes the study's settings from the shards, not from its own command line
    _run(["mode=merge", f"records_from={tmp_path / 'sweep'}", "logger=none",
          f"hydra.run.dir={tmp_path / 'merged'}"], tmp_path / "merge.log")

    merged = tmp_path / "merged"
    assert (merged / "records.jsonl").read_bytes() == (single / "records.jsonl").read_bytes()
    m1 = pd.read_csv(single / "metrics.csv")
    m2 = pd.read_csv(merged / "metrics.csv")
    pd.testing.assert_frame_equal(m1, m2, check_exact=True)
    assert len(m1) > 0 and set(m1.n) == {1, 2, 4}
