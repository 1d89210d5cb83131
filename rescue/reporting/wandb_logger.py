"""Weights & Biases behind the `Logger` seam: offline unless a key is configured, never fatal.

An offline run lands in `<dir>/wandb/offline-run-*` and can be uploaded later with
`wandb sync <that dir>`. Every call is guarded: if W&B fails (no network, bad key, a version
quirk) a warning is logged and the experiment goes on — the files in the run directory are the
record, W&B is a view of them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from rescue.reporting.overlays import OverlayItem, mask_layers
from rescue.reporting.tables import ESTIMATOR_ORDER, SELECTOR_ORDER, ordered, with_subset
from rescue.reporting.wandb_offline import has_exited

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
GT_CLASSES = {0: "background", 1: "target", 2: "ignore"}
SERIES_METRICS = ("giou", "ciou")


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


class WandbLogger:
    """A W&B run per experiment run; Hydra sweeps share `group` so W&B shows them as one study.

    `mode` None means `default_mode()` (offline unless `WANDB_MODE` or `WANDB_API_KEY` says
    otherwise). `dir` is where `wandb/offline-run-*` is written (the Hydra run directory).
    """

    def __init__(self, project: str = "rescue", entity: str | None = None,
                 mode: str | None = None, dir: str | Path | None = None,
                 group: str | None = None, tags: Sequence[str] = (), job_type: str = "run",
                 settings: Mapping[str, Any] | None = None,
                 flush_timeout_s: float = 30.0) -> None:
        self.project = project
        self.entity = entity
        self.mode = mode or default_mode()
        self.dir = Path(dir) if dir is not None else None
        self.group = group
        self.tags = tuple(tags)
        self.job_type = job_type
        # console capture off: Hydra already logs to the run dir and tqdm bars stay intact
        self.settings = {"console": "off", **(settings or {})}
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
        all_tags = [*self.tags, *tags, *(["simulated"] if simulated else [])]
        all_tags = list(dict.fromkeys(t[:64] for t in all_tags if t))
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = dict(
            project=self.project, entity=self.entity, mode=self.mode,
            dir=str(self.dir) if self.dir is not None else None, group=self.group,
            job_type=self.job_type, name=name, tags=all_tags, config=dict(config),
            settings=wandb.Settings(**self.settings))
        try:
            self._run = wandb.init(reinit="create_new", **kwargs)
        except (TypeError, ValueError):  # wandb older than 0.19.10 knows only reinit=True
            self._run = wandb.init(reinit=True, **kwargs)
        t2 = time.perf_counter()
        self.timings.update(import_s=t1 - t0, init_s=t2 - t1)
        self.run_dir = None if self.mode == "disabled" else Path(self._run.dir).parent
        self._run.define_metric("n")
        log.info("W&B %s run %s in %s (started in %.2f s)", self.mode, self._run.id,
                 self.run_dir, t2 - t0)

    @_guarded("log_metrics")
    def log_metrics(self, metrics: pd.DataFrame) -> None:
        wandb = self._wandb
        df = with_subset(metrics)
        self._run.log({"metrics_table": wandb.Table(dataframe=metrics.reset_index(drop=True))})
        prefixes = {k.rsplit("/", 2)[0] for k in (
            _series_key(str(sub), str(e), "x", "y")
            for sub, e in df[["subset", "estimator"]].drop_duplicates().itertuples(index=False))}
        for prefix in sorted(prefixes):
            self._run.define_metric(f"{prefix}/*", step_metric="n")
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
        images = []
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
            images.append(wandb.Image(small, masks=masks,
                                      caption=f"{item.record.sample_id}: {item.record.query}"))
        if images:
            self._run.log({"samples": images})

    @_guarded("log_summary")
    def log_summary(self, summary: Mapping[str, Any]) -> None:
        clean = {k: v for k, v in summary.items() if _finite(v)}
        self._run.summary.update(clean)
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
