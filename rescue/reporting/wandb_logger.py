"""Weights & Biases behind the `Logger` seam: offline unless a key is configured, never fatal.

An offline run lands in `<dir>/wandb/offline-run-*` and can be uploaded later with
`wandb sync <that dir>`. Every call is guarded: if W&B fails (no network, bad key, a version
quirk) a warning is logged and the experiment goes on — the files in the run directory are the
record, W&B is a view of them.

Runs are logged to be compared in W&B (`analysis.wandb_report`): every job of a study shares
`group`, `job_type` and tags; `config.study` names the swept keys; the summary holds flat keys
that mean the same thing in every run (`summary_keys`); curves are history series with `n` as
their x axis, and the (subset, estimator, selector, N) numbers are the `metrics_table`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from rescue.reporting.overlays import OverlayItem, mask_layers
from rescue.reporting.plots import COST_AXES
from rescue.reporting.tables import (
    BOUNDS,
    ESTIMATOR_ORDER,
    SELECTOR_ORDER,
    ordered,
    with_subset,
)
from rescue.reporting.wandb_offline import has_exited

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
GT_CLASSES = {0: "background", 1: "target", 2: "ignore"}
SERIES_METRICS = ("giou", "ciou")
METRICS_TABLE = "metrics_table"
SAMPLES_TABLE = "samples_table"
SAMPLES_COLUMNS = ["sample_id", "query", "overlay", "selected", "selected_iou", "best_iou"]
NOT_AXES = ("hydra.", "hydra/", "paths.", "logger", "pipeline.", "report.", "records_from")
"""Overrides that say where or how a run is logged, never what it measures (the same rule as
`analysis.runs.IGNORED_PREFIXES`): never a study's axis."""


def default_mode(env: Mapping[str, str] | None = None) -> str:
    """`WANDB_MODE` if set, else "online" only when `WANDB_API_KEY` is set, else "offline"."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def _guarded(what: str) -> Callable[[F], F]:
    """Turn an exception inside a W&B call into one warning; the run goes on."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(self: WandbLogger, *args: Any, **kwargs: Any) -> Any:
            if self._run is None and what != "start":
                return None
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
                log.warning("W&B %s failed (%s: %s); the run goes on without it", what,
                            type(exc).__name__, exc)
                return None

        return inner  # type: ignore[return-value]

    return wrap


def _series_key(subset: str, estimator: str, selector: str, metric: str) -> str:
    head = f"{estimator}" if subset == "all" else f"{subset}/{estimator}"
    return f"{head}/{selector}/{metric}"


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


@contextlib.contextmanager
def _weave_quiet() -> Iterator[None]:
    """W&B prints a Weave advertisement at init when the openai package is imported (the chat
    clients use it), whatever `silent` says. Its switch is an environment variable, so it is
    set for the call only, unless the user set it (to false: they want Weave)."""
    if "WANDB_DISABLE_WEAVE" in os.environ:
        yield
        return
    os.environ["WANDB_DISABLE_WEAVE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("WANDB_DISABLE_WEAVE", None)


@dataclass(frozen=True)
class StudyContext:
    """Where a run sits in its study, so W&B shows the jobs of a sweep as one comparable set.

    `swept` are the keys that tell this run from the others of its study: a multirun's sweep
    axes (read from the sweep's `multirun.yaml`), else every key the command line overrode.
    """

    group: str | None = None
    sweep_dir: str | None = None
    job_num: int | None = None
    overrides: tuple[str, ...] = ()
    swept: tuple[str, ...] = ()
    choices: dict[str, str] = field(default_factory=dict)

    @property
    def multirun(self) -> bool:
        return self.job_num is not None

    def to_config(self) -> dict[str, Any]:
        """`config.study` of the W&B run."""
        return {"group": self.group, "multirun": self.multirun, "sweep_dir": self.sweep_dir,
                "job_num": self.job_num, "overrides": list(self.overrides),
                "swept": list(self.swept), "choices": dict(self.choices)}


def override_keys(overrides: Sequence[str], sweeps_only: bool = False) -> list[str]:
    """The keys of Hydra command-line overrides (`+`/`++` dropped, deletions skipped), minus
    those that only say where or how a run is logged; `sweeps_only`: just the swept ones."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for o in OverridesParser.create().parse_overrides([str(x) for x in overrides]):
        if o.is_delete() or (sweeps_only and not o.is_sweep_override()):
            continue
        if not o.key_or_group.startswith(NOT_AXES):
            keys.append(o.key_or_group)
    return list(dict.fromkeys(keys))


def sweep_axes(sweep_dir: str | Path) -> list[str] | None:
    """The swept keys of the multirun whose sweep directory this is, from the `multirun.yaml`
    Hydra's sweeper writes there before the jobs start; None where it cannot be read."""
    import yaml

    path = Path(sweep_dir) / "multirun.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return override_keys(saved["hydra"]["overrides"]["task"], sweeps_only=True)
    except Exception:  # no file (another sweeper), or not the layout we know
        return None


def sweep_group(sweep_dir: str | Path) -> str:
    """A multirun's W&B group: the sweep directory's last two parts (`demo/2026-05-01_12-00`)."""
    parts = Path(sweep_dir).parts
    return "/".join(parts[-2:])[:128]


def hydra_study() -> dict[str, Any]:
    """What Hydra knows of the running job: `sweep_dir`, `job_num` (None outside a multirun),
    `overrides` (the job's `hydra.overrides.task`) and `choices`; empty outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {"sweep_dir": str(hc.sweep.dir) if multirun else None,
            "job_num": int(hc.job.num) if multirun else None,
            "overrides": [str(o) for o in hc.overrides.task],
            "choices": OmegaConf.to_container(hc.runtime.choices)}


def study_context(study: Mapping[str, Any] | str | None,
                  group: str | None = None) -> StudyContext:
    """The run's `StudyContext`: from `study` (`sweep_dir`, `job_num`: None outside a multirun,
    `overrides`, `choices`), or "hydra" to read them off the running Hydra job
    (`hydra_study`). An explicit `group` wins; a multirun's jobs are otherwise grouped by
    sweep."""
    study = hydra_study() if study == "hydra" else (study or {})
    if not isinstance(study, Mapping):
        raise TypeError(f"study must be a mapping or 'hydra', got {study!r}")
    job_num = study.get("job_num")
    sweep_dir = study.get("sweep_dir")
    overrides = tuple(str(o) for o in study.get("overrides") or ())
    multirun = job_num is not None and sweep_dir is not None
    axes = sweep_axes(sweep_dir) if multirun else None
    choices = {str(k): str(v) for k, v in (study.get("choices") or {}).items()
               if v is not None and not str(k).startswith("hydra")}
    return StudyContext(
        group=group or (sweep_group(sweep_dir) if multirun else None),
        sweep_dir=str(sweep_dir) if multirun else None,
        job_num=int(job_num) if multirun else None, overrides=overrides,
        swept=tuple(axes if axes is not None else override_keys(overrides)), choices=choices)


def config_column(config: Mapping[str, Any], key: str) -> str:
    """The W&B config path that holds swept `key`: the key itself for a value
    (`verifier.noise`), `study.choices.<group>` for a config group's option (`verifier`)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return key
        node = node[part]
    return f"study.choices.{key}" if isinstance(node, Mapping) else key


def summary_keys(metrics: pd.DataFrame) -> dict[str, float]:
    """Flat headline keys for comparing runs, best-of-N over all samples: `giou@<N>/<selector>`,
    `ciou@<N>/<selector>` for every N of the grid, the same at `max` (comparable across runs
    with different max_n), and each upper bound's gIoU as `oracle@<N>` / `oracle@max`."""
    df = with_subset(metrics)
    if (df["subset"].astype(str) == "all").any():
        df = df[df["subset"].astype(str) == "all"]
    block = df[df["estimator"].astype(str) == "best_of_n"]
    out: dict[str, float] = {}
    if block.empty:
        return out
    max_n = int(block["n"].max())
    for r in block.itertuples(index=False):
        n, sel = int(r.n), str(r.selector)
        for metric in SERIES_METRICS:
            value = getattr(r, metric)
            if not _finite(value):
                continue
            out[f"{metric}@{n}/{sel}"] = float(value)
            if n == max_n:
                out[f"{metric}@max/{sel}"] = float(value)
            if metric == "giou" and sel in BOUNDS:
                out[f"{sel}@{n}"] = float(value)
                if n == max_n:
                    out[f"{sel}@max"] = float(value)
    return out


def flat_summary(summary: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """summary.json as flat W&B summary keys (`failure_share/plan`), non-finite values dropped,
    plus `gain` (gIoU@max − gIoU@1 of the primary selector). A future nested block (`cost`)
    becomes `cost/...` the same way."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}{sep}{k}" if prefix else str(k), v)
        elif _finite(value):
            out[prefix] = value

    walk("", summary)
    if "gain@max" in out:
        out["gain"] = out["gain@max"]
    return out


class WandbLogger:
    """A W&B run per experiment run; Hydra sweeps share `group` so W&B shows them as one study.

    `mode` None means `default_mode()` (offline unless `WANDB_MODE` or `WANDB_API_KEY` says
    otherwise). `dir` is where `wandb/offline-run-*` is written (the Hydra run directory).
    """

    def __init__(self, project: str = "rescue", entity: str | None = None,
                 mode: str | None = None, dir: str | Path | None = None,
                 group: str | None = None, tags: Sequence[str] = (), job_type: str = "run",
                 settings: Mapping[str, Any] | None = None,
                 flush_timeout_s: float = 30.0,
                 study: Mapping[str, Any] | str | None = None) -> None:
        self.project = project
        self.entity = entity
        self.mode = mode or default_mode()
        self.dir = Path(dir) if dir is not None else None
        self.group = group
        self.tags = tuple(tags)
        self.job_type = job_type
        # where the run sits in its study: a mapping, or "hydra" (read off the job at start)
        self.study = study if isinstance(study, str) else dict(study or {})
        # console capture off: Hydra already logs to the run dir and tqdm bars stay intact;
        # quiet and silent: no history sparklines and summary table at finish (the run's files
        # have them), no banner or integration tips at start; this logger's own two lines say
        # where the run is and how to sync it
        self.settings = {"console": "off", "quiet": True, "silent": True, **(settings or {})}
        self.flush_timeout_s = flush_timeout_s
        self.timings: dict[str, float] = {}
        self.errors: list[str] = []
        self.run_dir: Path | None = None
        self._run: Any = None
        self._wandb: Any = None

    @_guarded("start")
    def start(self, config: Mapping[str, Any], name: str, tags: Sequence[str] = (),
              simulated: bool = False) -> None:
        t0 = time.perf_counter()
        import wandb

        self._wandb = wandb
        t1 = time.perf_counter()
        context = study_context(self.study, self.group)
        all_tags = [*self.tags, *tags, *(["sweep"] if context.multirun else []),
                    *(["simulated"] if simulated else [])]
        all_tags = list(dict.fromkeys(t[:64] for t in all_tags if t))
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = dict(
            project=self.project, entity=self.entity, mode=self.mode,
            dir=str(self.dir) if self.dir is not None else None, group=context.group,
            job_type=self.job_type, name=name, tags=all_tags,
            config={**config, "study": context.to_config()},
            settings=wandb.Settings(**self.settings))
        try:
            with _weave_quiet():
                self._run = wandb.init(reinit="create_new", **kwargs)
        except (TypeError, ValueError):  # wandb older than 0.19.10 knows only reinit=True
            self._run = wandb.init(reinit=True, **kwargs)
        t2 = time.perf_counter()
        self.timings.update(import_s=t1 - t0, init_s=t2 - t1)
        self.run_dir = None if self.mode == "disabled" else Path(self._run.dir).parent
        self._run.define_metric("n", summary="none")
        log.info("W&B %s run %s in %s (started in %.2f s)", self.mode, self._run.id,
                 self.run_dir, t2 - t0)

    @_guarded("log_metrics")
    def log_metrics(self, metrics: pd.DataFrame) -> None:
        wandb = self._wandb
        df = with_subset(metrics)
        self._run.log({METRICS_TABLE: wandb.Table(dataframe=df.reset_index(drop=True))})
        prefixes = {k.rsplit("/", 2)[0] for k in (
            _series_key(str(sub), str(e), "x", "y")
            for sub, e in df[["subset", "estimator"]].drop_duplicates().itertuples(index=False))}
        for prefix in sorted(prefixes):
            # curves, not headlines: their last value stays out of the summary
            self._run.define_metric(f"{prefix}/*", step_metric="n", summary="none")
        for n in sorted(int(v) for v in df["n"].unique()):
            row: dict[str, Any] = {"n": n}
            for r in df[df["n"] == n].itertuples(index=False):
                for metric in SERIES_METRICS:
                    value = getattr(r, metric)
                    if _finite(value):
                        row[_series_key(str(r.subset), str(r.estimator), str(r.selector),
                                        metric)] = float(value)
            self._run.log(row)
        self._line_charts(df)
        self._run.summary.update(summary_keys(df))

    def _line_charts(self, df: pd.DataFrame) -> None:
        """Custom line-series charts (IoU vs N, one line per selector) for the main subset."""
        wandb = self._wandb
        main = df[df["subset"].astype(str) == "all"] if (df["subset"] == "all").any() else df
        charts: dict[str, Any] = {}
        for est in ordered(main["estimator"].astype(str).unique(), ESTIMATOR_ORDER):
            block = main[main["estimator"] == est]
            sels = ordered(block["selector"].astype(str).unique(), SELECTOR_ORDER)
            for metric in SERIES_METRICS:
                xs, ys = [], []
                for sel in sels:
                    s = block[block["selector"] == sel].sort_values("n")
                    xs.append([int(v) for v in s["n"]])
                    ys.append([float(v) if _finite(v) else None for v in s[metric]])
                charts[f"charts/{est}/{metric}_vs_n"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=sels, title=f"{metric} vs N ({est})", xname="N")
            for cost in COST_AXES:  # quality per unit of compute (issue 12), N along each line
                if cost not in block.columns or not block[cost].notna().any():
                    continue
                lines = [block[(block["selector"] == sel) & block[cost].notna()].sort_values("n")
                         for sel in sels]
                keep = [k for k, s in enumerate(lines) if len(s)]
                charts[f"charts/{est}/giou_vs_{cost}"] = wandb.plot.line_series(
                    xs=[[float(v) for v in lines[k][cost]] for k in keep],
                    ys=[[float(v) if _finite(v) else None for v in lines[k]["giou"]]
                        for k in keep],
                    keys=[sels[k] for k in keep], title=f"giou vs {cost} ({est})", xname=cost)
        if charts:
            self._run.log(charts)

    @_guarded("log_images")
    def log_images(self, images: Mapping[str, Path]) -> None:
        wandb = self._wandb
        payload = {name: wandb.Image(str(path)) for name, path in images.items()
                   if Path(path).is_file()}
        if payload:
            self._run.log(payload)

    @_guarded("log_overlays")
    def log_overlays(self, items: Sequence[OverlayItem]) -> None:
        """Each sample once, ground truth and top candidates as W&B mask layers."""
        wandb = self._wandb
        images, rows = [], []
        for item in items:
            small, layers = mask_layers(item)
            by_index = {c.index: c for c in item.record.candidates}
            masks: dict[str, Any] = {}
            for name, data in layers.items():
                if name == "ground_truth":
                    labels = GT_CLASSES
                else:
                    idx = item.selected if name == "selected" else int(name.rsplit("_", 1)[1])
                    c = by_index.get(idx) if idx is not None else None
                    v = c.verifier_score if c is not None else None
                    label = f"#{idx} verifier {v:.2f} IoU {c.iou:.2f}" if (
                        c is not None and v is not None) else f"#{idx}"
                    labels = {0: "background", 1: label}
                masks[name] = {"mask_data": data, "class_labels": labels}
            caption = f"{item.record.sample_id}: {item.record.query}"
            images.append(wandb.Image(small, masks=masks, caption=caption))
            picked = by_index.get(item.selected) if item.selected is not None else None
            ious = [c.iou for c in item.record.candidates if _finite(c.iou)]
            rows.append([item.record.sample_id, item.record.query,
                         wandb.Image(small, masks=masks, caption=caption), item.selected,
                         picked.iou if picked is not None else None,
                         max(ious) if ious else None])
        if images:
            self._run.log({"samples": images,
                           SAMPLES_TABLE: wandb.Table(columns=SAMPLES_COLUMNS, data=rows)})

    @_guarded("log_summary")
    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._run.summary.update(flat_summary(summary))
        if summary.get("simulated") and "simulated" not in (self._run.tags or ()):
            self._run.tags = (*(self._run.tags or ()), "simulated")

    @_guarded("finish")
    def finish(self) -> None:
        t0 = time.perf_counter()
        run, self._run = self._run, None
        run.finish()
        if self.mode == "offline" and self.run_dir is not None:
            self._wait_for_log(self.run_dir)
            log.info("W&B offline run saved; upload it with: wandb sync %s", self.run_dir)
        self.timings["finish_s"] = time.perf_counter() - t0

    def _wait_for_log(self, run_dir: Path) -> None:
        """wandb's `finish()` can return before its writer flushes the offline log; wait for it.

        Without this a process that reads the run (or exits) right away can miss the summary.
        """
        if not any(run_dir.glob("*.wandb")):
            return  # nothing written (or not a file-backed run): nothing to wait for
        deadline = time.monotonic() + self.flush_timeout_s
        while not has_exited(run_dir):
            if time.monotonic() > deadline:
                log.warning("W&B offline log %s has no exit record after %.0f s", run_dir,
                            self.flush_timeout_s)
                return
            time.sleep(0.02)
