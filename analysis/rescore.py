"""Re-score a finished run offline: a new selector from the cached scores, no model called.

    python -m analysis.rescore <run dir> --selector-weights verifier=1,consensus=0.5

The new selector's score of a candidate is a weighted sum of existing selectors' scores, each
z-scored within the sample's pool (so a verifier's [0, 1] and consensus IoU mix on one scale).
It is evaluated exactly as the run's own selectors were — same estimators, N grid, bootstrap,
seed and accounting, read from the run's config — and written next to the original table as
`metrics_rescore_<weights>.csv` / `.md`, holding the run's selectors and the new one (paired
intervals: the same bootstrap resamples).

Scores within a pool: a failed candidate (no mask) stays last, as for every selector; a working
candidate lacking one component (e.g. its verification failed) gets that component's worst
z-score in the pool minus 1, so it ranks below every scored candidate on that term. With a
single weight the ranking, and so every number, equals that selector's — except consensus,
which enters here as its pool-level score (a fixed score per candidate), while the consensus
selector itself is scored within each N-subset (`rescue/consensus.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs import load_run
from rescue import selection
from rescue.evaluation import ESTIMATORS, evaluate
from rescue.records import SampleRecord
from rescue.reporting.plots import plot_iou_vs_n
from rescue.reporting.tables import metrics_markdown

CARRIER = "verifier"
"""The selector whose score field carries the combined score through `evaluate`."""


def parse_weights(text: str) -> dict[str, float]:
    """`verifier=1,consensus=0.5` -> {"verifier": 1.0, "consensus": 0.5}, checked."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"bad weight {part!r}: expected selector=weight")
        selection.get(name)  # unknown names list the valid ones
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"bad weight {part!r}: {value!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"bad weight {part!r}: weights must be finite and >= 0")
        if name in weights:
            raise ValueError(f"selector {name!r} is weighted twice")
        weights[name] = w
    if not weights or not any(weights.values()):
        raise ValueError(f"no positive weight in {text!r}")
    return weights


def _zscores(scores: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """z-scores over the working candidates that have a score; the rest as the module says."""
    scored = ok & np.isfinite(scores) & (scores != selection.UNSCORED)
    z = np.zeros(len(scores))
    if scored.any():
        vals = scores[scored]
        std = vals.std()
        z[scored] = (vals - vals.mean()) / std if std > 0 else 0.0
        z[ok & ~scored] = z[scored].min() - 1.0
    return z


def combined_scores(record: SampleRecord, weights: Mapping[str, float],
                    seed: int = 0) -> np.ndarray:
    """The weighted sum of z-scored selector scores of one pool; -inf for failed candidates."""
    cands = record.candidates
    ok = np.array([c.ok for c in cands], dtype=bool)
    total = np.zeros(len(cands))
    for name, w in weights.items():
        if w:
            raw = selection.scores(name, cands, key=record.sample_id, seed=seed)
            total += w * _zscores(np.asarray(raw, dtype=float), ok)
    return np.where(ok, total, -np.inf)


def _carried(record: SampleRecord, scores: np.ndarray) -> SampleRecord:
    """A copy of the record whose verifier scores are `scores` (the record itself is kept)."""
    cands = [dataclasses.replace(c, verifier_score=float(s) if c.ok else None)
             for c, s in zip(record.candidates, scores, strict=True)]
    return dataclasses.replace(record, candidates=cands)


def rescore(records: Sequence[SampleRecord], weights: Mapping[str, float], name: str,
            n_grid: Sequence[int], estimators: Sequence[str] = ESTIMATORS,
            bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Metrics rows of the combined selector, labelled `name`, as `evaluate` computes them.

    The combined score rides in the verifier field of copies of the records, so `evaluate`
    (estimators, bootstrap, accounting) runs unchanged; only the selector column is renamed.
    """
    carried = [_carried(r, combined_scores(r, weights, seed)) for r in records]
    df = evaluate(carried, n_grid, [CARRIER], estimators=estimators, bootstrap=bootstrap, ci=ci,
                  seed=seed)
    df["selector"] = name
    return df


def default_name(weights: Mapping[str, float]) -> str:
    return "+".join(f"{w:g}*{s}" for s, w in weights.items())


def _slug(weights: Mapping[str, float]) -> str:
    return "_".join(f"{s}-{w:g}" for s, w in weights.items())


def rescore_run(run_dir: str | Path, weights: Mapping[str, float], name: str | None = None,
                out_dir: str | Path | None = None, bootstrap: int | None = None,
                plot: bool = True) -> dict[str, Path]:
    """Evaluate the run's selectors and the combined one with the run's own settings; write
    `metrics_rescore_<weights>.csv/.md` (and the gIoU plot) into `out_dir` (the run dir)."""
    run = load_run(run_dir)
    recs = run.records()
    cfg = run.config
    sel = cfg.get("selection", {})
    n_grid = [int(n) for n in cfg.get("n_grid", [1])]
    settings = dict(
        estimators=list(sel.get("estimators", ESTIMATORS)),
        bootstrap=int(sel.get("bootstrap", 1000) if bootstrap is None else bootstrap),
        ci=float(sel.get("ci", 0.95)),
        seed=int(cfg.get("seed", 0)),
    )
    selectors = list(sel.get("selectors", selection.SELECTORS))
    name = name or default_name(weights)
    if name in selectors:
        raise ValueError(f"name {name!r} is already a selector; choose another with --name")
    base = evaluate(recs, n_grid, selectors, **settings)
    new = rescore(recs, weights, name, n_grid, **settings)
    metrics = pd.concat([base, new], ignore_index=True)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    stem = f"metrics_rescore_{_slug(weights)}"
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    metrics.to_csv(paths["csv"], index=False)
    paths["md"].write_text(metrics_markdown(metrics, simulated=run.simulated), encoding="utf-8")
    if plot:
        paths["plot"] = plot_iou_vs_n(metrics, out / f"iou_vs_n_rescore_{_slug(weights)}.png",
                                      "giou", estimator=settings["estimators"][0],
                                      simulated=run.simulated)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (with records.jsonl and .hydra/)")
    parser.add_argument("--selector-weights", required=True,
                        help="e.g. verifier=1,consensus=0.5 (selectors: "
                             + ", ".join(selection.SELECTORS) + ")")
    parser.add_argument("--name", help="the new selector's name in the table")
    parser.add_argument("--out", help="where to write (default: the run directory)")
    parser.add_argument("--bootstrap", type=int, help="resamples (default: the run's)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    try:
        weights = parse_weights(args.selector_weights)
        paths = rescore_run(args.run_dir, weights, args.name, args.out, args.bootstrap,
                            plot=not args.no_plot)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
