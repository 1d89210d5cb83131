"""The CPU demo's outputs are byte-identical to the stored ones (a refactoring changes no number).

The digests are those of `python run.py` (the demo is deterministic: seeded simulators, a fresh
cache, sorted records): records.jsonl since each candidate carries its cost (issue 12:
tokens of the simulated planner and verifier, the executor's prompts; no number changed);
metrics.csv since its `exact`,
`giou_mc_se` and `ciou_mc_se` columns and consensus draws chosen from a target standard error
(issue 10), the only change to its numbers being consensus at N = 4 and 8; since its column
`simulated` (issue 11: the lines without it hash to the previous 6588de2e…06eb); and since its
cost columns (issue 12: the expected tokens, prompts and masks per sample at N beside every
row; no quality number changed), and since its verify_calls columns (issue 12: the
verifier's requests, equal to verify_masks for the demo's pointwise verifier; every other
column equal, cost_units' text aside), and since consensus draws a 32-draw pilot where the
target SE sets the count (issue 16: consensus and the drawn policies' Monte-Carlo rows move
within their reported SE). A change that means to alter the demo's records or metrics
updates them here, in the same commit, and says why.

metrics.csv is hashed with every float written to 10 significant digits, so a numeric
library's last-bit noise does not fail the test: on 2026-12-06 a fresh machine's install
changed its bytes (records.jsonl identical; the same new bytes under numpy 2.2-2.4 and pandas
2.2-3.1, so the cause lies elsewhere in that install; not found).
"""

import csv
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = {
    "records.jsonl": "84f7c1d34ef0f946a180861daedda70571dd05a805bc5ddc0cc4b4df34cd201d",
    "metrics.csv": "be08a97864acc3237df5c92dc400091f2a7dd0d54c50a823ef81bfe91927d4ed",
}

pytestmark = pytest.mark.slow


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rounded(table: Path) -> bytes:
    """The CSV with each float cell at 10 significant digits (text, ints and empty as is)."""
    def cell(text: str) -> str:
        if text.isdigit() or not text:
            return text
        try:
            return f"{float(text):.10g}"
        except ValueError:
            return text
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        [cell(c) for c in row] for row in csv.reader(io.StringIO(table.read_text())))
    return out.getvalue().encode()


def test_the_demo_writes_the_stored_records_and_metrics(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {"records.jsonl": _sha256((tmp_path / "run" / "records.jsonl").read_bytes()),
           "metrics.csv": _sha256(_rounded(tmp_path / "run" / "metrics.csv"))}
    assert got == DIGESTS
    for table in ("metrics.csv", "failures.csv"):  # a table copied out of its run says it
        lines = (tmp_path / "run" / table).read_text().splitlines()
        assert lines[0].endswith(",simulated") and all(ln.endswith(",True") for ln in lines[1:])
