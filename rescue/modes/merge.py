"""Join the records of a sharded study into what one unsharded run would have written.

A study too big for one job runs as `subset.num_shards=k 'subset.shard=range(k)'` (a SLURM array
through Hydra's submitit launcher, or joblib on one machine); every job writes its own run
directory and all share `paths.cache_dir`. `merge_runs` checks the shards belong together (same
dataset, models, max_n, seed and selection of samples; every shard present once; no sample in
two shards) and writes one `records.jsonl`. `main` (`mode=merge`) then evaluates and reports
with the study's own settings, read from the shards' saved configs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from rescue import records, truth
from rescue.errors import UserError
from rescue.evaluation import headline
from rescue.modes.evaluate import reevaluate
from rescue.records import SampleRecord
from rescue.run_dir import NoRunsError, RunDir, find_runs

log = logging.getLogger("rescue")

STUDY_KEYS = ("dataset", "planner", "executor", "verifier", "max_n", "seed")
"""Config sections that decide what a record contains; they must agree across shards."""

SUBSET_KEYS = ("fraction", "limit", "seed", "num_shards")
"""The selection of samples the shards cut up (everything in `subset` but `shard`)."""

PLACE_KEYS = frozenset({
    "root", "coco_dir", "cache_dir",  # where a node mounts the data
    "base_url", "api_base", "url", "endpoint", "host", "port", "api_key", "token",
    "timeout", "timeout_s", "max_concurrency", "concurrency", "retries", "max_retries",
})
"""Keys that say where or how fast, not what: jobs on different nodes may differ in them."""

EVAL_KEYS = ("max_n", "n_grid", "seed", "selection")
"""Settings `main` takes from the shards so the merged metrics equal the unsharded run's. Not
`report`: what the merge draws is the merge command's (shards of a sweep often ran with
`report.plot=false`; the merge is where the plots are wanted)."""


class MergeError(UserError, ValueError):
    """The runs given do not form one complete sharded study."""


def _strip(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _strip(v) for k, v in node.items() if k not in PLACE_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _load_config(run: RunDir) -> dict[str, Any]:
    if not run.hydra_config_file.is_file():
        raise MergeError(f"{run.path} is not a Hydra run directory: {run.hydra_config_file} "
                         "is missing")
    return run.config()


def _diff(a: Any, b: Any, where: str = "") -> str:
    """The first place two config trees differ, for the error message."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                return _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}.{k}")
    return f"{where.lstrip('.')}: {a!r} vs {b!r}"


def study_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What must be equal across the shards of one study."""
    subset = cfg.get("subset") or {}
    return {**{k: _strip(cfg.get(k)) for k in STUDY_KEYS},
            "subset": {k: subset.get(k) for k in SUBSET_KEYS}}


def merge_runs(run_dirs: Sequence[Path], out_dir: Path) -> list[SampleRecord]:
    """Check the shards form one complete study; write `out_dir/records.jsonl`; return its records
    (sorted by sample id, as every records.jsonl is)."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise MergeError("no run directories to merge")
    configs = [_load_config(RunDir(d)) for d in dirs]
    studies = [study_of(c) for c in configs]
    for d, s in zip(dirs[1:], studies[1:], strict=True):
        if s != studies[0]:
            raise MergeError(f"{d} is not a shard of the same study as {dirs[0]}: "
                             f"{_diff(studies[0], s)}")
    num_shards = int(studies[0]["subset"]["num_shards"] or 1)
    by_shard: dict[int, Path] = {}
    for d, c in zip(dirs, configs, strict=True):
        shard = int((c.get("subset") or {}).get("shard") or 0)
        if not 0 <= shard < num_shards:
            raise MergeError(f"{d}: shard {shard} outside 0..{num_shards - 1}")
        if shard in by_shard:
            raise MergeError(f"shard {shard} appears twice: {by_shard[shard]} and {d}")
        by_shard[shard] = d
    missing = sorted(set(range(num_shards)) - set(by_shard))
    if missing:
        raise MergeError(f"shards {missing} of {num_shards} are missing (have "
                         f"{sorted(by_shard)}); run them (finished samples come from the cache)")
    merged: list[SampleRecord] = []
    owner: dict[str, int] = {}
    truths: list[truth.SampleTruth] = []
    for shard in range(num_shards):
        masks_src = RunDir(by_shard[shard]).masks_file
        if masks_src.is_file():  # runs made before issue 13 have none
            truths += truth.read(masks_src)
        src = RunDir(by_shard[shard]).records_file
        if not src.is_file():
            raise MergeError(f"shard {shard} ({by_shard[shard]}) has no records.jsonl: it did not "
                             "finish; rerun it (finished samples come from the cache)")
        for rec in records.read(src):
            if rec.sample_id in owner:
                raise MergeError(f"sample {rec.sample_id!r} is in shard {owner[rec.sample_id]} "
                                 f"and shard {shard}")
            owner[rec.sample_id] = shard
            merged.append(rec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records.write(RunDir(out_dir).records_file, merged)
    if truths:
        truth.write(RunDir(out_dir).masks_file, truths)
    log.info("merged %d records from %d shards into %s", len(merged), num_shards, out_dir)
    return sorted(merged, key=lambda r: r.sample_id)


def find_shards(sources: str | Path | Iterable[str | Path], exclude: Path | None = None
                ) -> list[Path]:
    """The generation runs (`mode=run`) named, or found below a multirun (sweep) directory
    (`rescue.run_dir.find_runs`), but `exclude` (the merge's own output): an earlier merge or
    evaluate below the same folder is not a shard."""
    try:
        found = find_runs(sources)
    except NoRunsError as exc:
        raise MergeError(f"records_from: {exc}") from None
    ex = exclude.resolve() if exclude is not None else None
    return [d for d in found if d != ex and RunDir(d).hydra_config_file.is_file()
            and RunDir(d).mode == "run"]


def main(cfg: DictConfig) -> float | None:
    """`mode=merge records_from=<multirun dir | [run dirs]>`: merge, evaluate, report.

    Evaluation uses the study's settings (max_n, n_grid, seed, selection) from the shards, so
    the merged metrics are those the unsharded run reports; `report.*` is this command's.
    """
    if not cfg.get("records_from"):
        raise MergeError("mode=merge needs records_from=<multirun dir> or a list of run dirs")
    out_dir = Path(cfg.paths.output_dir)
    src = cfg.records_from
    runs = find_shards(list(src) if OmegaConf.is_list(src) else str(src), exclude=out_dir)
    merge_runs(runs, out_dir)
    study = OmegaConf.load(RunDir(runs[0]).hydra_config_file)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for k in EVAL_KEYS:
            if k in study:
                cfg[k] = study[k]
        cfg.records_from = str(out_dir)
    result = reevaluate(cfg)
    return headline(result["metrics"], result["settings"])
