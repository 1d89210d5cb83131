"""Run directories as data: find them, load them, and stack a sweep into one study table.

A run directory is what `python run.py` writes (`rescue.run_dir`: `metrics.csv`,
`records.jsonl`, `.hydra/`). A Hydra multirun writes one per job under numbered subdirectories
of its sweep directory; the jobs of one sweep are one study, told apart by the command-line
overrides that vary between them (`verifier.noise=0.1,0.3`), which become the study table's
columns.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rescue import records
from rescue.records import SampleRecord
from rescue.run_dir import MARKERS, NoRunsError, RunDir
from rescue.run_dir import find_runs as find_runs  # the analysis tools' name for it
from rescue.settings import EvaluationSettings

log = logging.getLogger("analysis")

IGNORED_PREFIXES = ("hydra.", "hydra/", "paths.", "logger", "pipeline.", "report.", "records_from")
"""Overrides that say where or how a run is logged, never what it measures: not study axes."""


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class Run:
    """One run directory, read back. `config` is `.hydra/config.yaml` as saved (interpolations
    unresolved); `choices` is the option Hydra picked for each config group."""

    path: Path
    config: dict[str, Any]
    overrides: list[str]
    metrics: pd.DataFrame
    stats: dict[str, Any]
    simulated: bool
    choices: dict[str, str] = field(default_factory=dict)

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def records_path(self) -> Path:
        """The run's records; a `mode=evaluate` run has none and reads its `records_from`'s."""
        return self.dir.records_source

    def records(self) -> list[SampleRecord]:
        return self.dir.records()

    def evaluation_settings(self) -> EvaluationSettings:
        """How the run evaluated its metrics.csv, from its saved `config_resolved.yaml`
        (`.hydra/config.yaml` for a run that wrote none); its records' pools bound N."""
        resolved = self.dir.resolved_config()
        return EvaluationSettings.from_config(resolved or self.config, bounded=False)

    def override_values(self) -> dict[str, str]:
        """`key -> value` of the command-line overrides (`+`/`++` prefixes dropped)."""
        out = {}
        for item in self.overrides:
            key, sep, value = str(item).partition("=")
            if sep:
                out[key.lstrip("+~")] = value
        return out

    def setting(self, key: str) -> str | None:
        """What `key` was in this run even where no override named it: the group's chosen
        option (`verifier` -> `simulated`), else the config value (`verifier.noise` -> 0.3)."""
        overrides = self.override_values()
        if key in overrides:
            return overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return _text(node)


def _text(value: Any) -> str:
    """A config value written as an override would write it (`null`, `[1,2,4]`)."""
    if isinstance(value, Mapping | list):
        return json.dumps(value, separators=(",", ":"), default=str)
    return "null" if value is None else str(value)


def _flag(run: RunDir, stats: Mapping[str, Any]) -> bool | None:
    for source in (stats, _json(run.summary_file)):
        if "simulated" in source:
            return bool(source["simulated"])
    return None


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. Metrics come from `metrics.csv` (empty frame when absent)."""
    rd = RunDir(Path(run_dir).resolve())
    if not rd.is_run():
        raise NoRunsError(f"{rd.path} is not a run directory (no {' or '.join(MARKERS)})")
    metrics = pd.read_csv(rd.metrics_file) if rd.metrics_file.is_file() else pd.DataFrame()
    # `simulated` is the run's (Run.simulated), not a metric
    metrics = metrics.drop(columns=["simulated"], errors="ignore")
    stats = _json(rd.stats_file)
    run = Run(path=rd.path, config=rd.config(), overrides=rd.overrides(), metrics=metrics,
              stats=stats, simulated=bool(_flag(rd, stats)), choices=rd.choices())
    if _flag(rd, stats) is None and run.records_path.is_file():
        run.simulated = any(r.simulated for r in records.read(run.records_path))
    return run


def user_path(text: str | Path, root: str | Path,
              env: Mapping[str, str] | None = None) -> Path:
    """A path the user typed, as they meant it: absolute as it is; relative against the
    directory they ran the command from (`$PWD`: a notebook kernel inherits it while its own
    working directory is the notebook's folder), else against the repo `root`; never against
    the notebook's folder. Where neither holds it, the first candidate (the error names it)."""
    p = Path(text).expanduser()
    if p.is_absolute():
        return p
    pwd = (os.environ if env is None else env).get("PWD")
    bases = [Path(pwd)] if pwd else []
    bases.append(Path(root))
    for base in bases:
        if (base / p).exists():
            return (base / p).resolve()
    return bases[0] / p


def has_results(run_dir: str | Path) -> bool:
    """The run wrote metrics or records: a job that failed before any result (or is still
    running) has neither, and is no part of a study."""
    rd = RunDir(Path(run_dir))
    return rd.metrics_file.is_file() or rd.records_file.is_file()


def load_runs(sources: str | Path | Sequence[str | Path]) -> list[Run]:
    """The runs of `sources` (`find_runs`: failed runs left out) that have results, read; the
    run directories left empty are named in one warning. None with results: `NoRunsError`."""
    found = find_runs(sources)
    empty = [p for p in found if not has_results(p)]
    if empty:
        log.warning("skipping %d run director%s without results (failed early or still "
                    "running): %s", len(empty), "y" if len(empty) == 1 else "ies",
                    ", ".join(str(p) for p in empty))
    runs = [load_run(p) for p in found if p not in empty]
    if not runs:
        raise NoRunsError("no run with results (metrics.csv or records.jsonl) in "
                          + ", ".join(str(s) for s in ([sources] if isinstance(sources, str | Path)
                                                       else sources)))
    return runs


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between the runs, in first-seen order."""
    keys = dict.fromkeys(k for r in runs for k in r.override_values())
    keys = [k for k in keys if not k.startswith(IGNORED_PREFIXES)]
    return [k for k in keys if len({r.setting(k) for r in runs}) > 1]


def run_labels(runs: Sequence[Run]) -> list[str]:
    """A short unique name per run: its varying overrides (`verifier.noise=0.1`), else its
    directory name, with the parent prepended until names are unique."""
    keys = varying_keys(runs)
    labels = [" ".join(f"{k}={r.setting(k)}" for k in keys) or r.path.name for r in runs]
    if len(set(labels)) < len(labels):
        where = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
        labels = [f"{lab} ({w})" if keys else w for lab, w in zip(labels, where, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{i}]" for i, lab in enumerate(labels)]
    return labels


def _typed(values: list[str | None]) -> pd.Series:
    """Numbers as numbers (so `verifier.noise` sorts), anything else as text."""
    series = pd.Series(values, dtype=object)
    numeric = pd.to_numeric(series, errors="coerce")
    if numeric.notna().sum() == series.notna().sum():
        return numeric
    return series


def study_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Every metrics row of every run, with `run` (its label), `run_dir`, `simulated`, and one
    column per override key that varies across the runs."""
    if not runs:
        raise NoRunsError("no runs to tabulate")
    keys = varying_keys(runs)
    frames = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        if run.metrics.empty:
            continue
        df = run.metrics.copy()
        df.insert(0, "run", label)
        df.insert(1, "run_dir", str(run.path))
        df.insert(2, "simulated", run.simulated)
        for i, k in enumerate(keys):
            df.insert(3 + i, k, run.setting(k))
        frames.append(df)
    if not frames:
        raise NoRunsError("none of the runs has a metrics.csv (evaluate them with "
                          "`python run.py mode=evaluate records_from=<run dir>`)")
    table = pd.concat(frames, ignore_index=True)
    for k in keys:
        table[k] = _typed(table[k].tolist())
    table.attrs["varying"] = keys
    return table


def newest_run(root: str | Path) -> Path:
    """The run directory under `root` (searched recursively) whose metrics.csv is newest; a
    failed run (`RunDir.failed`) is passed over."""
    root = Path(root)
    found = [RunDir(p.parent) for p in root.rglob("metrics.csv")] if root.is_dir() else []
    found = [r for r in found if not r.failed()]
    if not found:
        raise NoRunsError(f"no run directory under {root}; run `python run.py` first")
    return max(found, key=lambda r: r.metrics_file.stat().st_mtime).path


def cli(write: Callable[[], Mapping[str, Path]], errors: tuple[type[Exception], ...]) -> int:
    """An analysis command's ending: the paths it wrote on stdout (exit 0), or one of `errors`
    in one line on stderr (exit 2, no traceback)."""
    try:
        paths = write()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    return 0
