"""`mode=run` (the default): generate every candidate (or read it back from the cache), then
evaluate and report.

A run directory holds `records.jsonl` (every candidate of every sample), `metrics.csv` and
`metrics.md` (every selector and N), `stats.json` (every model call, cache hit and dedupe),
plots and overlays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rescue import console, listwise, records, truth
from rescue.cache import Cache
from rescue.datasets.base import Dataset
from rescue.datasets.subset import select_ids
from rescue.evaluation import headline
from rescue.failures import StageGuard
from rescue.models.roles import Models
from rescue.modes.evaluate import report
from rescue.pipeline import Pipeline
from rescue.records import SampleRecord
from rescue.run_dir import RunDir
from rescue.sample import Sample
from rescue.settings import EvaluationSettings

if TYPE_CHECKING:  # reporting draws with matplotlib and OpenCV: loaded when a report is made
    from rescue.reporting.overlays import OverlayItem

log = logging.getLogger("rescue")


def probe_sample(dataset: Dataset, ids: Sequence[str], tries: int = 4) -> Sample | None:
    """The first of the run's samples that loads (a corrupt image is the pipeline's to
    record, not the preflight's to crash on)."""
    for sid in ids[:tries]:
        try:
            return dataset.load(sid)
        except Exception as exc:  # reported per sample by the run itself
            log.debug("probe sample %s does not load: %s", sid, exc)
    return None


async def _generate(cfg: DictConfig, models: Models, dataset: Dataset, ids: list[str],
                    out_dir: Path, cache: Cache, settings: EvaluationSettings
                    ) -> tuple[list[SampleRecord], Pipeline, dict[str, Any]]:
    check = not cfg.offline
    probe = probe_sample(dataset, ids) if check and cfg.pipeline.get("probe", True) else None
    async with models.ready(check=check, offline=bool(cfg.offline), sample=probe):
        pipe = Pipeline(models.planner, models.executor, models.verifier, cache,
                        max_n=int(cfg.max_n),
                        samples_in_flight=int(cfg.pipeline.samples_in_flight),
                        progress=bool(cfg.pipeline.progress),
                        guard=StageGuard(**dict(cfg.pipeline.get("abort") or {})),
                        plan=listwise.Plan(settings.n_grid, settings.seed,
                                           settings.consensus_draws))
        partial = RunDir(out_dir).partial_records_file
        partial.unlink(missing_ok=True)
        partial.touch()  # there from the start: a run stopped before any sample finished
        recs = await pipe.run(dataset, ids, partial=partial)  # leaves it empty, not absent
        return recs, pipe, models.endpoint_stats()


def overlay_items(cfg: DictConfig, dataset: Dataset, pipe: Pipeline,
                  recs: Sequence[SampleRecord], settings: EvaluationSettings
                  ) -> list[OverlayItem]:
    """A few samples drawn with their candidates (the primary selector's pick marked)."""
    from rescue.reporting.overlays import OverlayItem

    items = []
    for rec in [r for r in recs if r.candidates][: int(cfg.report.overlays)]:
        items.append(OverlayItem(sample=dataset.load(rec.sample_id), record=rec,
                                 masks=pipe.masks.of(rec),
                                 selected=settings.primary.answer(rec, settings.seed)))
    return items


def subset_description(subset: Mapping[str, Any]) -> str:
    """What part of the split a run evaluates, as the overrides that say so: a run that
    evaluates 10% says it at the start, not only in its config."""
    parts = [f"subset.fraction={subset.get('fraction')}" if subset.get("fraction") is not None
             else "the whole split"]
    if subset.get("limit") is not None:
        parts.append(f"subset.limit={subset.get('limit')}")
    if int(subset.get("num_shards") or 1) > 1:
        parts.append(f"shard {subset.get('shard')} of {subset.get('num_shards')}")
    return ", ".join(parts)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate (or read back from the cache) every candidate, then evaluate and report."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = EvaluationSettings.from_config(cfg)  # fail before any model call
    run_dir = RunDir(out_dir)
    run_dir.resolved_config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    models = Models.from_config(cfg)  # a bad model config fails before the data is scanned
    dataset: Dataset = instantiate(cfg.dataset)
    every = dataset.sample_ids()
    ids = select_ids(every, fraction=cfg.subset.fraction, limit=cfg.subset.limit,
                     shard=int(cfg.subset.shard), num_shards=int(cfg.subset.num_shards),
                     seed=int(cfg.subset.seed))
    log.info("dataset %s: %d of %d samples selected (%s; max_n=%d)", dataset.name, len(ids),
             len(every), subset_description(cfg.subset), cfg.max_n)
    cache = Cache(cfg.paths.cache_dir, offline=bool(cfg.offline))
    t0 = time.perf_counter()
    recs, pipe, endpoints = asyncio.run(_generate(cfg, models, dataset, ids, out_dir, cache,
                                                       settings))
    gen_s = time.perf_counter() - t0
    records.write(run_dir.records_file, recs)
    truth.write(run_dir.masks_file, pipe.truths.values())
    run_dir.partial_records_file.unlink(missing_ok=True)
    stats = {"generation_seconds": round(gen_s, 3), "calls": pipe.stats.to_json(),
             "cache": cache.stats(), "simulated": pipe.simulated,
             "endpoints": endpoints, "models": pipe.identities}
    run_dir.stats_file.write_text(json.dumps(stats, indent=2, default=str))
    items = (overlay_items(cfg, dataset, pipe, recs, settings)
             if int(cfg.report.overlays) > 0 else [])
    metrics, paths = report(cfg, out_dir, recs, settings, items, simulated=pipe.simulated,
                            truths=pipe.truths)
    _log_to_logger(cfg, metrics, paths, items, simulated=pipe.simulated)
    log.info("%d samples, %d model calls", len(recs), pipe.stats.model_calls)
    _log_verifier_calls(pipe)
    console.final_block(recs, metrics, settings, out_dir, simulated=pipe.simulated,
                        max_truncated=float(cfg.pipeline.get("max_truncated_share", 0.05)))
    return {"records": recs, "metrics": metrics, "stats": stats, "paths": paths,
            "settings": settings}


def _log_verifier_calls(pipe: Pipeline) -> None:
    """What the verifier's evaluation needed, on the console: per verifier stage (verify,
    compare, choose) the answers it rests on, read from the cache or asked now."""
    st = pipe.stats
    parts = [f"{stage} {st.cached[stage] + st.items[stage]} ({st.cached[stage]} cached, "
             f"{st.requests[stage]} asked)" for stage in ("verify", "compare", "choose")
             if st.cached[stage] or st.requests[stage]]
    if parts:
        log.info("verifier (%s): %s", pipe.verifier_shape, " | ".join(parts))


def _log_to_logger(cfg: DictConfig, metrics: pd.DataFrame, paths: dict[str, Path],
                   items: Sequence[OverlayItem], *, simulated: bool) -> None:
    from rescue.reporting import log_report

    logger = instantiate(cfg.logger)
    logger.start(OmegaConf.to_container(cfg, resolve=True), name=str(cfg.task_name),
                 tags=[str(cfg.task_name)], simulated=simulated)
    try:
        log_report(logger, paths, metrics, items)
    finally:
        logger.finish()


def main(cfg: DictConfig) -> float | None:
    """Run; the primary selector's gIoU at max N (for sweepers). A stopped run (its records so
    far stay in records.partial.jsonl) or a failed preflight ends in one line (`rescue.app`)."""
    result = run(cfg)
    return headline(result["metrics"], result["settings"])
