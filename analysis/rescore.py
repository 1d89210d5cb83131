"""Re-score a finished run offline: a new selector from the cached scores, no model called.

    python -m analysis.rescore <run dir> --selector-weights verifier=1,consensus=0.5

The new selector's score of a candidate is a weighted sum of existing selectors' scores, each
z-scored within the sample's pool (so a verifier's [0, 1] and consensus IoU mix on one scale).
It is a `Selector` like any other, evaluated exactly as the run's own selectors were — same
settings (`Run.evaluation_settings`: estimators, N grid, bootstrap, seed, consensus draws) and
accounting — and written next to the original table as
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

from analysis.runs import cli, load_run
from rescue import selection, truth
from rescue.evaluation import evaluate
from rescue.records import CandidateRecord, SampleRecord
from rescue.reporting.plots import Bands, plot_iou_vs_n
from rescue.reporting.tables import metrics_markdown
from rescue.selection import Selector
from rescue.settings import EvaluationSettings


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


def default_name(weights: Mapping[str, float]) -> str:
    return "+".join(f"{w:g}*{s}" for s, w in weights.items())


def combined_selector(weights: Mapping[str, float], name: str | None = None) -> Selector:
    """The selector scoring a pool by the weighted sum of z-scored selector scores; failed
    candidates -inf. Named `default_name(weights)` unless `name` is given."""
    parts = [(selection.get(s), w) for s, w in weights.items() if w]

    def score(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
        ok = np.array([c.ok for c in candidates], dtype=bool)
        total = np.zeros(len(candidates))
        for sel, w in parts:
            raw = sel.scores(candidates, key=key, seed=seed)
            total += w * _zscores(np.asarray(raw, dtype=float), ok)
        return np.where(ok, total, -np.inf)

    return Selector(name or default_name(weights), score)


def rescore(records: Sequence[SampleRecord], weights: Mapping[str, float], name: str,
            settings: EvaluationSettings) -> pd.DataFrame:
    """Metrics rows of the combined selector, labelled `name`, as `evaluate` computes them
    with `settings` (their selectors aside)."""
    new = combined_selector(weights, name)
    return evaluate(records, dataclasses.replace(settings, selectors=(new,), primary=new,
                                                 aggregators=()))


def _slug(weights: Mapping[str, float]) -> str:
    return "_".join(f"{s}-{w:g}" for s, w in weights.items())


def rescore_run(run_dir: str | Path, weights: Mapping[str, float], name: str | None = None,
                out_dir: str | Path | None = None, bootstrap: int | None = None,
                plot: bool = True) -> dict[str, Path]:
    """Evaluate the run's selectors and the combined one with the run's own settings; write
    `metrics_rescore_<weights>.csv/.md` (and the gIoU plot) into `out_dir` (the run dir)."""
    run = load_run(run_dir)
    recs = run.records()
    settings = run.evaluation_settings()
    if bootstrap is not None:
        settings = dataclasses.replace(settings, bootstrap=bootstrap)
    name = name or default_name(weights)
    if name in {s.name for s in settings.selectors}:
        raise ValueError(f"name {name!r} is already a selector; choose another with --name")
    # aggregators read the run's stored truth and masks (masks.jsonl beside its records)
    truths = truth.load(run.dir.masks_source) if settings.aggregators else None
    base = evaluate(recs, settings, truths=truths)
    new = rescore(recs, weights, name, settings)
    metrics = pd.concat([base, new], ignore_index=True)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    stem = f"metrics_rescore_{_slug(weights)}"
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    metrics.assign(simulated=run.simulated).to_csv(paths["csv"], index=False)  # as metrics.csv
    paths["md"].write_text(metrics_markdown(metrics, simulated=run.simulated), encoding="utf-8")
    if plot:
        # shaded: the new selector (the question) and the upper bounds, at the run's level
        paths["plot"] = plot_iou_vs_n(metrics, out / f"iou_vs_n_rescore_{_slug(weights)}.png",
                                      "giou", estimator=settings.estimators[0],
                                      simulated=run.simulated,
                                      selectors=(*settings.selectors, *settings.aggregators),
                                      bands=Bands.of(settings, primary=name))
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
    return cli(lambda: rescore_run(args.run_dir, parse_weights(args.selector_weights),
                                   args.name, args.out, args.bootstrap, plot=not args.no_plot),
               (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
