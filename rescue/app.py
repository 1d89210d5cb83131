"""From a composed Hydra config to a finished run directory.

`run.py` hands the config here; each `mode` is one function. A run directory holds
`records.jsonl` (every candidate of every sample), `metrics.csv`/`metrics.md` (every selector
and N), `stats.json` (every model call, cache hit and dedupe), plots and overlays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rescue import records
from rescue.cache import Cache
from rescue.datasets.base import Dataset
from rescue.datasets.subset import select_ids
from rescue.evaluation import curve, evaluate, failure_shares, headline, truncation_shares
from rescue.failures import RunAborted, StageGuard
from rescue.pipeline import Pipeline
from rescue.protocols import aclose, preflight
from rescue.records import SampleRecord
from rescue.sample import Sample
from rescue.settings import EvaluationSettings

log = logging.getLogger("rescue")


class PreflightError(RuntimeError):
    """An endpoint is down, slow, or serves another model; one line per problem."""


@dataclass
class Models:
    planner: Any
    executor: Any
    verifier: Any

    def all(self) -> dict[str, Any]:
        return {"planner": self.planner, "executor": self.executor, "verifier": self.verifier}


def build_models(cfg: DictConfig) -> Models:
    return Models(planner=instantiate(cfg.planner), executor=instantiate(cfg.executor),
                  verifier=instantiate(cfg.verifier))


async def check_endpoints(models: Models, sample: Sample | None = None) -> None:
    """Every endpoint is up and serves its model; with `sample`, each accepts a real request
    of the run (`rescue.models.probe`). One line per problem, before any work."""
    results = await asyncio.gather(*(preflight(m) for m in models.all().values()))
    if sample is not None and not any(results):
        results = await asyncio.gather(*(preflight(m, sample) for m in models.all().values()))
    problems = [f"{role}: {p}" for role, ps in zip(models.all(), results, strict=True) for p in ps]
    if problems:
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))


def probe_sample(dataset: Dataset, ids: Sequence[str], tries: int = 4) -> Sample | None:
    """The first of the run's samples that loads (a corrupt image is the pipeline's to
    record, not the preflight's to crash on)."""
    for sid in ids[:tries]:
        try:
            return dataset.load(sid)
        except Exception as exc:  # reported per sample by the run itself
            log.debug("probe sample %s does not load: %s", sid, exc)
    return None


def endpoint_stats(models: Models) -> dict[str, Any]:
    """Requests, retries and failures per HTTP endpoint, from clients that count them."""
    return {role: m.stats() for role, m in models.all().items()
            if callable(getattr(m, "stats", None))}


async def _generate(cfg: DictConfig, dataset: Dataset, ids: list[str], out_dir: Path,
                    cache: Cache) -> tuple[list[SampleRecord], Pipeline, dict[str, Any]]:
    models = build_models(cfg)
    try:
        if not cfg.offline:
            probe = probe_sample(dataset, ids) if cfg.pipeline.get("probe", True) else None
            await check_endpoints(models, probe)
        pipe = Pipeline(models.planner, models.executor, models.verifier, cache,
                        max_n=int(cfg.max_n),
                        samples_in_flight=int(cfg.pipeline.samples_in_flight),
                        progress=bool(cfg.pipeline.progress),
                        guard=StageGuard(**dict(cfg.pipeline.get("abort") or {})))
        partial = out_dir / "records.partial.jsonl"
        partial.unlink(missing_ok=True)
        recs = await pipe.run(dataset, ids, partial=partial)
        return recs, pipe, endpoint_stats(models)
    finally:
        for m in models.all().values():
            await aclose(m)


def overlay_items(cfg: DictConfig, dataset: Dataset, pipe: Pipeline,
                  recs: Sequence[SampleRecord], settings: EvaluationSettings) -> list[Any]:
    """A few samples drawn with their candidates (the primary selector's pick marked)."""
    from rescue.reporting.overlays import OverlayItem

    items = []
    for rec in [r for r in recs if r.candidates][: int(cfg.report.overlays)]:
        sample = dataset.load(rec.sample_id)
        items.append(OverlayItem(sample=sample, record=rec, masks=pipe.masks_of(sample, rec),
                                 selected=settings.primary.answer(rec, settings.seed)))
    return items


def _write_report(cfg: DictConfig, out_dir: Path, recs: Sequence[SampleRecord],
                  metrics: pd.DataFrame, items: Sequence[Any], settings: EvaluationSettings,
                  *, simulated: bool) -> dict[str, Path]:
    from rescue.reporting import write_report

    return write_report(out_dir, recs, metrics, items, simulated=simulated,
                        primary=settings.primary.name, selectors=settings.selectors,
                        plots=bool(cfg.report.plot))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate (or read back from the cache) every candidate, then evaluate and report."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = EvaluationSettings.from_config(cfg)  # fail before any model call
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    dataset: Dataset = instantiate(cfg.dataset)
    ids = select_ids(dataset.sample_ids(), fraction=cfg.subset.fraction, limit=cfg.subset.limit,
                     shard=int(cfg.subset.shard), num_shards=int(cfg.subset.num_shards),
                     seed=int(cfg.subset.seed))
    log.info("dataset %s: %d samples selected (max_n=%d)", dataset.name, len(ids), cfg.max_n)
    cache = Cache(cfg.paths.cache_dir, offline=bool(cfg.offline))
    t0 = time.perf_counter()
    recs, pipe, endpoints = asyncio.run(_generate(cfg, dataset, ids, out_dir, cache))
    gen_s = time.perf_counter() - t0
    records.write(out_dir / "records.jsonl", recs)
    (out_dir / "records.partial.jsonl").unlink(missing_ok=True)
    stats = {"generation_seconds": round(gen_s, 3), "calls": pipe.stats.to_json(),
             "cache": cache.stats(), "simulated": pipe.simulated,
             "endpoints": endpoints, "models": pipe.identities}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, default=str))
    metrics = evaluate(recs, settings)
    items = (overlay_items(cfg, dataset, pipe, recs, settings)
             if int(cfg.report.overlays) > 0 else [])
    paths = _write_report(cfg, out_dir, recs, metrics, items, settings, simulated=pipe.simulated)
    _log_to_logger(cfg, metrics, paths, items, simulated=pipe.simulated)
    log.info("%d samples, %d model calls, outputs in %s", len(recs), pipe.stats.model_calls,
             out_dir)
    _log_failure_shares(recs, float(cfg.pipeline.get("max_truncated_share", 0.05)))
    _log_headline(metrics, settings, simulated=pipe.simulated)
    return {"records": recs, "metrics": metrics, "stats": stats, "paths": paths,
            "settings": settings}


def _log_failure_shares(recs: Sequence[SampleRecord], max_truncated: float) -> None:
    """Each stage's failure share and truncation rate, on the console; a warning when replies
    were cut off at max_tokens more often than `pipeline.max_truncated_share`."""
    shares = failure_shares(recs)
    if shares:
        log.info("failed: %s", " | ".join(f"{stage} {100 * v:.1f}%" for stage, v in
                                          shares.items()))
    for stage, share in truncation_shares(recs).items():
        if share > max_truncated:
            log.warning("%s: %.1f%% of replies were cut off at max_tokens (> %.1f%%): raise "
                        "%s.sampling.max_tokens", stage, 100 * share, 100 * max_truncated,
                        "planner" if stage == "plan" else "verifier")


def _log_to_logger(cfg: DictConfig, metrics: pd.DataFrame, paths: dict[str, Path],
                   items: Sequence[Any], *, simulated: bool) -> None:
    from rescue.reporting import log_report

    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), name=str(cfg.task_name),
                 tags=[str(cfg.task_name)], simulated=simulated)
    try:
        log_report(logger, paths, metrics, items)
    finally:
        logger.finish()


def _log_headline(metrics: pd.DataFrame, settings: EvaluationSettings, *,
                  simulated: bool) -> None:
    """The number the study is about, on the console: the primary selector's gIoU from N=1 to
    max N beside the upper bounds' (the oracle; best-of-N over all samples)."""
    bounds = [s.name for s in settings.selectors if s.needs_truth and s != settings.primary]
    line = []
    for sel in (settings.primary.name, *bounds):
        s = curve(metrics, sel)
        if len(s):
            line.append(f"{sel} " + " ".join(f"@{int(n)}:{100 * g:.1f}"
                                              for n, g in zip(s.n, s.giou, strict=True)))
    if line:
        log.info("gIoU%% (best-of-N%s): %s", ", SIMULATED models" if simulated else "",
                 " | ".join(line))


def evaluate_only(cfg: DictConfig) -> dict[str, Any]:
    """Recompute metrics from an existing run's records (`records_from=<run dir>`)."""
    # the pools are whatever the run generated: N is bounded by them, not by this max_n
    settings = EvaluationSettings.from_config(cfg, bounded=False)
    src = Path(cfg.records_from) / "records.jsonl"
    if not src.is_file():
        raise FileNotFoundError(f"mode=evaluate needs records_from=<run dir>; {src} not found")
    recs = list(records.read(src))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # what made this metrics.csv, for the analysis tools (`analysis.runs.Run.evaluation_settings`)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    metrics = evaluate(recs, settings)
    paths = _write_report(cfg, out_dir, recs, metrics, [], settings,
                          simulated=any(r.simulated for r in recs))
    return {"records": recs, "metrics": metrics, "paths": paths, "settings": settings}


def main(cfg: DictConfig) -> float | None:
    """Dispatch on `cfg.mode`; returns the primary selector's gIoU at max N (for sweepers)."""
    mode = str(cfg.mode)
    if mode == "run":
        try:
            result = run(cfg)
        except RunAborted as exc:  # one line; the records so far stay in records.partial.jsonl
            log.error("run stopped: %s", exc)
            raise SystemExit(f"rescue: run stopped: {exc}") from None
        except PreflightError as exc:  # one line per problem, no traceback: nothing ran yet
            raise SystemExit(f"rescue: {exc}") from None
    elif mode == "evaluate":
        result = evaluate_only(cfg)
    elif mode == "infer":
        from rescue.infer import main as infer_main

        return infer_main(cfg)
    elif mode == "merge":
        from rescue.merge import main as merge_main

        return merge_main(cfg)
    else:
        raise ValueError(f"unknown mode={mode!r}; valid modes: run, evaluate, infer, merge")
    return headline(result["metrics"], result["settings"])
