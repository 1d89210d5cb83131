"""A study as one W&B report: `python -m analysis.wandb_report <study dir | W&B group>`.

The report (built with `wandb-workspaces`, `pip install -e ".[report]"`) has, for the runs of
the study's W&B group:
- quality vs N: gIoU and cIoU against N for each selector, one line per run, the oracle dashed;
- the study table: the runs table with the swept keys and the headline pinned, a parallel
  coordinates plot of the same, the primary selector's gIoU@max per run, every run's
  `metrics_table` (every subset, estimator, selector and N);
- failures: each stage's failure share and the share of replies cut off at max_tokens;
- samples: the overlays of each run side by side (mask layers toggle) and their table;
- quality vs compute: gIoU@max against each `cost/...` summary key, where the runs have any.
A saved workspace view for the project gets the same panels, filtered to the group.

Online (`WANDB_MODE=online` or `WANDB_API_KEY` set, the logger's rule) it saves both and prints
their URLs. Offline, or with `--dry-run`, nothing leaves the machine: it writes the report's and
the view's specifications (`wandb_report.json`, `wandb_workspace.json`: the library's models as
dicts) into the study directory and prints how to publish them after `wandb sync`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.runs import NoRunsError, find_runs, has_results
from rescue.evaluation import STAGES
from rescue.reporting.tables import BOUNDS, METRIC_TITLES, SELECTOR_ORDER, ordered
from rescue.reporting.wandb_logger import (
    METRICS_TABLE,
    SAMPLES_TABLE,
    SERIES_METRICS,
    config_column,
    default_mode,
)
from rescue.reporting.wandb_offline import read_run

SPEC_FILES = {"report": "wandb_report.json", "workspace": "wandb_workspace.json"}
COST_PREFIX = "cost/"
INSTALL_HINT = 'the report needs wandb-workspaces: pip install -e ".[report]"'


@dataclass(frozen=True)
class StudyRun:
    """One W&B run of the study as the report needs it. `history_keys` None: not known (a run
    read through the API), so panels are not checked against it."""

    run_id: str
    name: str
    group: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    history_keys: frozenset[str] | None = None
    tables: dict[str, list[str]] = field(default_factory=dict)
    """Summary key of each logged table → its columns (offline runs only)."""
    path: Path | None = None


@dataclass(frozen=True)
class Study:
    """The runs of one W&B group and what they have in common."""

    group: str | None
    project: str
    entity: str
    runs: tuple[StudyRun, ...]
    swept: tuple[str, ...] = ()
    directory: Path | None = None

    @property
    def primary(self) -> str:
        found = Counter(str(r.summary["primary"]) for r in self.runs if "primary" in r.summary)
        return found.most_common(1)[0][0] if found else "verifier"

    def has_summary(self, key: str) -> bool:
        """Every run has `key` in its summary (all of them: a panel must mean the same thing in
        each); with no runs known, the logger's conventions are trusted."""
        return all(key in r.summary for r in self.runs)

    @property
    def selectors(self) -> list[str]:
        """Selectors with a `giou@max/<selector>` summary key in every run."""
        if not self.runs:
            return list(SELECTOR_ORDER)
        names = {k.split("/", 1)[1] for r in self.runs for k in r.summary
                 if k.startswith("giou@max/")}
        return [s for s in ordered(names, SELECTOR_ORDER) if self.has_summary(f"giou@max/{s}")]

    @property
    def bounds(self) -> list[str]:
        return [s for s in self.selectors if s in BOUNDS]

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if self.has_summary(f"failure_share/{s}")]

    @property
    def truncation_stages(self) -> list[str]:
        return [s for s in STAGES if self.has_summary(f"truncated_share/{s}")]

    @property
    def cost_keys(self) -> list[str]:
        """`cost/...` summary keys every run has (none until cost accounting logs them)."""
        if not self.runs:
            return []
        keys = {k for r in self.runs for k in r.summary if k.startswith(COST_PREFIX)}
        return sorted(k for k in keys if self.has_summary(k)
                      and all(_number(r.summary[k]) for r in self.runs))

    @property
    def columns(self) -> list[str]:
        """The W&B config paths of the swept keys (`verifier.noise`, `study.choices.verifier`)."""
        config = self.runs[0].config if self.runs else {}
        return list(dict.fromkeys(config_column(config, k) for k in self.swept))

    @property
    def headline(self) -> list[str]:
        p = self.primary
        keys = [f"giou@1/{p}", f"giou@max/{p}", f"ciou@max/{p}",
                *(f"{b}@max" for b in self.bounds), "gain"]
        return [k for k in keys if self.has_summary(k)]

    @property
    def simulated(self) -> bool:
        return any(r.summary.get("simulated") is True for r in self.runs)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def series_key(selector: str, metric: str, estimator: str = "best_of_n") -> str:
    """The history series the logger writes per N (`best_of_n/verifier/giou`, x axis `n`)."""
    return f"{estimator}/{selector}/{metric}"


# --- reading the runs ---------------------------------------------------------------------


def offline_run_dir(run_dir: Path) -> Path | None:
    """The newest `wandb/offline-run-*` of a run directory (a rerun into it adds another)."""
    found = sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir())
    return found[-1] if found else None


def _tables(files: Path, summary: Mapping[str, Any]) -> dict[str, list[str]]:
    out = {}
    for key, value in summary.items():
        if isinstance(value, Mapping) and value.get("_type") == "table-file" and value.get("path"):
            path = files / str(value["path"])
            if path.is_file():
                out[key] = list(json.loads(path.read_text(encoding="utf-8")).get("columns", []))
    return out


def _swept(runs: Iterable[StudyRun]) -> tuple[str, ...]:
    keys: dict[str, None] = {}
    for r in runs:
        keys.update(dict.fromkeys(str(k) for k in (r.config.get("study") or {}).get("swept", [])))
    return tuple(keys)


def offline_study(directory: str | Path, project: str | None = None,
                  entity: str | None = None) -> Study:
    """The study of a run or multirun directory, from its runs' offline W&B logs."""
    root = Path(directory)
    runs = []
    for run_dir in find_runs([root]):  # failed runs left out; empty ones below
        wandb_dir = offline_run_dir(run_dir) if has_results(run_dir) else None
        if wandb_dir is None:
            continue
        run = read_run(wandb_dir)
        runs.append(StudyRun(
            run_id=run.run_id, name=run.name, group=run.group or None, config=run.config,
            summary=run.summary,
            history_keys=frozenset(k for row in run.history for k in row),
            tables=_tables(wandb_dir / "files", run.summary), path=wandb_dir))
    if not runs:
        raise NoRunsError(f"{root}: no offline W&B run under its run directories "
                          "(<run>/wandb/offline-run-*); were they run with logger=wandb?")
    groups = {r.group for r in runs}
    if len(groups) > 1:
        raise ValueError(f"{root}: its runs belong to different W&B groups "
                         f"{sorted(str(g) for g in groups)}; a report covers one study")
    projects = {read_project(r) for r in runs} - {""}
    return Study(group=groups.pop(), project=project or (projects.pop() if len(projects) == 1
                                                         else "rescue"),
                 entity=entity or _entity(runs), runs=tuple(runs), swept=_swept(runs),
                 directory=root.resolve() if root.is_dir() else None)


def read_project(run: StudyRun) -> str:
    logger = run.config.get("logger") or {}
    return str(logger.get("project") or "") if isinstance(logger, Mapping) else ""


def _entity(runs: Sequence[StudyRun]) -> str:
    for r in runs:
        logger = r.config.get("logger") or {}
        if isinstance(logger, Mapping) and logger.get("entity"):
            return str(logger["entity"])
    return ""


def online_study(group: str, project: str, entity: str) -> Study:
    """The runs of a W&B group, through the public API."""
    import wandb

    api = wandb.Api()
    entity = entity or api.default_entity or ""
    runs = [StudyRun(run_id=r.id, name=r.name, group=group, config=dict(r.config),
                     summary=dict(r.summary_metrics))
            for r in api.runs(f"{entity}/{project}", filters={"group": group})]
    if not runs:
        raise NoRunsError(f"no runs in W&B group {group!r} of {entity}/{project}")
    return Study(group=group, project=project, entity=entity, runs=tuple(runs),
                 swept=_swept(runs))


# --- building the report ------------------------------------------------------------------


def _libs() -> tuple[Any, Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return wr, ws, expr


def run_filter(study: Study) -> list[Any]:
    """The runs of the study: its group, or its run ids where the runs have no group."""
    _, _, expr = _libs()
    if study.group:
        return [expr.Metric("Group") == study.group]
    return [expr.Metric("ID").isin([r.run_id for r in study.runs])]


def runs_columns(study: Study) -> list[str]:
    """The runs table's pinned columns: the swept keys, then the headline (W&B accessors; a
    nested config key is `config:<top>.value.<rest>`, as `wandb_workspaces` addresses it)."""
    cols = []
    for path in study.columns:
        head, _, rest = path.partition(".")
        cols.append(f"config:{head}.value" + (f".{rest}" if rest else ""))
    return cols + [f"summary:{k}" for k in study.headline]


def _curve_panels(study: Study, wr: Any) -> list[Any]:
    bounds = study.bounds
    panels = []
    for metric in SERIES_METRICS:
        title = METRIC_TITLES[metric]
        for sel in (s for s in study.selectors if s not in BOUNDS):
            y = [series_key(sel, metric), *(series_key(b, metric) for b in bounds)]
            dashed = {f"{r.run_id}:{series_key(b, metric)}": "dashed"
                      for r in study.runs for b in bounds}
            panels.append(wr.LinePlot(
                title=f"{title} vs N: {sel}" + (" (oracle dashed)" if bounds else ""),
                x="n", y=y, title_x="N", title_y=title, line_marks=dashed or None))
    return panels


def _table_panels(study: Study, wr: Any) -> list[Any]:
    p = study.primary
    axes = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(c)) for c in study.columns]
    axes += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(k)) for k in study.headline]
    best = [k for k in (f"giou@max/{p}", *(f"{b}@max" for b in study.bounds))
            if study.has_summary(k)]
    return [wr.ParallelCoordinatesPlot(title="Swept keys vs headline", columns=axes),
            wr.BarPlot(title=f"gIoU@max of {p} per run (and the oracle)",
                       metrics=[wr.SummaryMetric(k) for k in best]),
            wr.WeavePanelSummaryTable(table_name=METRICS_TABLE, layout=wr.Layout(w=24, h=12))]


def _failure_panels(study: Study, wr: Any) -> list[Any]:
    panels = []
    if study.stages:
        panels.append(wr.BarPlot(title="Failure share per stage", metrics=[
            wr.SummaryMetric(f"failure_share/{s}") for s in study.stages]))
    if study.truncation_stages:
        panels.append(wr.BarPlot(title="Replies cut off at max_tokens", metrics=[
            wr.SummaryMetric(f"truncated_share/{s}") for s in study.truncation_stages]))
    return panels


def _sample_panels(wr: Any) -> list[Any]:
    return [wr.MediaBrowser(title="Sample overlays, one column per run", media_keys=["samples"],
                            mode="grid", grid_x_axis="run", grid_y_axis="index",
                            layout=wr.Layout(w=24, h=12)),
            wr.WeavePanelSummaryTable(table_name=SAMPLES_TABLE, layout=wr.Layout(w=24, h=10))]


def _compute_panels(study: Study, wr: Any) -> list[Any]:
    y = f"giou@max/{study.primary}"
    return [wr.ScatterPlot(title=f"{y} vs {k}", x=wr.SummaryMetric(k), y=wr.SummaryMetric(y))
            for k in study.cost_keys]


def sections(study: Study, wr: Any) -> list[tuple[str, str, list[Any]]]:
    """(heading, what it shows, panels) for the report and the workspace alike."""
    p = study.primary
    return [
        ("Quality vs N", "gIoU (mean per-sample IoU) and cIoU (ΣI/ΣU) of best-of-N selection "
         "against N, one line per run for each selector, the oracle (true-IoU picks: an upper "
         "bound) dashed.", _curve_panels(study, wr)),
        ("Study table", "The swept keys against the headline (" + ", ".join(
            f"`{k}`" for k in study.headline) + f"); `{METRICS_TABLE}` holds every (subset, "
         "estimator, selector, N) row of every run.", _table_panels(study, wr)),
        ("Failures", "Per stage, the share of the candidates that reached it and failed there; "
         "the share of replies cut off at max_tokens.", _failure_panels(study, wr)),
        ("Samples", "The same samples in every run: image, truth and top candidates as mask "
         "layers, the primary selector's pick.", _sample_panels(wr)),
        ("Quality vs compute", f"gIoU@max of {p} against each `cost/...` key." if study.cost_keys
         else "No `cost/...` summary keys in these runs yet: this section fills in once runs "
         "log their compute.", _compute_panels(study, wr)),
    ]


def title(study: Study) -> str:
    return f"RESCue study {study.group or study.runs[0].name}"[:128]


def build_report(study: Study, bind_project: bool = False) -> Any:
    """The report. `bind_project` names the project in each run set, which makes the library
    look its id up on the server: only when saving online."""
    wr, _, _ = _libs()

    def runset() -> Any:  # one per panel grid: each has its own id
        return wr.Runset(entity=study.entity if bind_project else "",
                         project=study.project if bind_project else "",
                         name=f"study {study.group or 'runs'}", filters=run_filter(study),
                         pinned_columns=runs_columns(study))

    where = f"W&B group `{study.group}`" if study.group else "no W&B group (bound by run id)"
    swept = ", ".join(f"`{k}`" for k in study.swept) or "none"
    intro = f"{len(study.runs)} runs of {where} in project `{study.project}`. Swept: {swept}."
    blocks: list[Any] = [wr.P(intro)]
    if study.simulated:
        blocks.append(wr.P("SIMULATED models: these numbers measure the framework, not a "
                           "model."))
    for heading, text, panels in sections(study, wr):
        blocks += [wr.H2(heading), wr.P(text)]
        if panels:
            blocks.append(wr.PanelGrid(runsets=[runset()], panels=panels))
    return wr.Report(project=study.project, entity=study.entity, title=title(study),
                     description=intro, blocks=blocks, width="fluid")


def build_workspace(study: Study) -> Any:
    """A saved view of the project: the report's panels as sections, filtered to the study."""
    wr, ws, _ = _libs()
    return ws.Workspace(
        entity=study.entity, project=study.project, name=title(study),
        sections=[ws.Section(name=heading, panels=panels, is_open=True)
                  for heading, _, panels in sections(study, wr) if panels],
        settings=ws.WorkspaceSettings(x_axis="n", max_runs=max(10, len(study.runs))),
        runset_settings=ws.RunsetSettings(filters=run_filter(study),
                                          pinned_columns=runs_columns(study)))


def spec(obj: Any) -> dict[str, Any]:
    """A report's or workspace's specification: the library's model as a JSON-able dict."""
    return obj._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def write_specs(study: Study, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, obj in (("report", build_report(study)), ("workspace", build_workspace(study))):
        paths[name] = out_dir / SPEC_FILES[name]
        paths[name].write_text(json.dumps(spec(obj), indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    return paths


def publish_hint(study: Study, source: str) -> list[str]:
    runs = [str(r.path) for r in study.runs if r.path is not None]
    sync = ["wandb sync " + " ".join(runs)] if runs else []
    entity = study.entity or "<entity>"
    return ["To publish: upload the runs, then build the report online:", *sync,
            f"WANDB_MODE=online python -m analysis.wandb_report {source} --entity {entity} "
            f"--project {study.project}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.wandb_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run or multirun directory, or a W&B group name")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity, else "
                                         "your default entity when online)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the specifications only; nothing is sent")
    parser.add_argument("--out", help="where the specifications go (default: the study "
                                      "directory; the current one for a group name)")
    args = parser.parse_args(argv)
    online = not args.dry_run and default_mode() == "online"
    try:
        if Path(args.source).is_dir():
            study = offline_study(args.source, args.project, args.entity)
        elif online:
            study = online_study(args.source, args.project or "rescue", args.entity or "")
        else:  # a group name with no way to read its runs: the conventions alone
            study = Study(group=args.source, project=args.project or "rescue",
                          entity=args.entity or "", runs=())
        out_dir = Path(args.out or (study.directory or Path.cwd()))
        paths = write_specs(study, out_dir)
    except (NoRunsError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    if not online:
        print("\n".join(publish_hint(study, args.source)))
        return 0
    import wandb

    if not study.entity:
        study = dataclasses.replace(study, entity=wandb.Api().default_entity or "")
    report = build_report(study, bind_project=True).save()
    print(f"report: {report.url}")
    view = build_workspace(study).save()
    print(f"workspace: {view.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
