"""Run directories as data: find them, load them, and stack a sweep into one study table.

A run directory is what `python run.py` writes (`metrics.csv`, `records.jsonl`, `.hydra/`). A
Hydra multirun writes one per job under numbered subdirectories of its sweep directory; the jobs
of one sweep are one study, told apart by the command-line overrides that vary between them
(`verifier.noise=0.1,0.3`), which become the study table's columns.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rescue import records
from rescue.records import SampleRecord
from rescue.settings import EvaluationSettings

RUN_MARKERS = ("metrics.csv", "records.jsonl")
"""A directory holding either of these is a run directory."""

IGNORED_PREFIXES = ("hydra.", "hydra/", "paths.", "logger", "pipeline.", "report.", "records_from")
"""Overrides that say where or how a run is logged, never what it measures: not study axes."""


class NoRunsError(ValueError):
    """A source holds no run directory."""


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in RUN_MARKERS)


def _child_order(path: Path) -> tuple[int, int | str]:
    """Numbered job directories (0, 1, ..., 10) in numeric order, then the others by name."""
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def find_runs(sources: Iterable[str | Path]) -> list[Path]:
    """Run directories of each source: itself when it is a run, else its run subdirectories.

    Sources keep their order, jobs of a multirun their numeric order; a run named twice is
    listed once. A source that is missing or holds no run is an error naming it.
    """
    found: list[Path] = []
    for src in sources:
        path = Path(src)
        if not path.is_dir():
            raise NoRunsError(f"{path}: no such directory")
        if is_run_dir(path):
            runs = [path]
        else:
            runs = sorted((p for p in path.iterdir() if is_run_dir(p)), key=_child_order)
        if not runs:
            raise NoRunsError(
                f"{path} holds no run: a run directory has {' or '.join(RUN_MARKERS)}, a "
                "multirun directory has run directories as numbered subdirectories"
            )
        found += [r.resolve() for r in runs]
    return list(dict.fromkeys(found))


def _yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


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
    def records_path(self) -> Path:
        """The run's records; a `mode=evaluate` run has none and reads its `records_from`'s."""
        own = self.path / "records.jsonl"
        source = self.config.get("records_from")
        if not own.is_file() and self.config.get("mode") == "evaluate" and source:
            return Path(str(source)) / "records.jsonl"
        return own

    def records(self) -> list[SampleRecord]:
        if not self.records_path.is_file():
            raise FileNotFoundError(f"{self.records_path} not found")
        return list(records.read(self.records_path))

    def evaluation_settings(self) -> EvaluationSettings:
        """How the run evaluated its metrics.csv, from its saved `config_resolved.yaml`
        (`.hydra/config.yaml` for a run that wrote none); its records' pools bound N."""
        resolved = _yaml(self.path / "config_resolved.yaml")
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


def _flag(run_dir: Path, stats: Mapping[str, Any]) -> bool | None:
    for source in (stats, _json(run_dir / "summary.json")):
        if "simulated" in source:
            return bool(source["simulated"])
    return None


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. Metrics come from `metrics.csv` (empty frame when absent)."""
    path = Path(run_dir).resolve()
    if not is_run_dir(path):
        raise NoRunsError(f"{path} is not a run directory (no {' or '.join(RUN_MARKERS)})")
    metrics_path = path / "metrics.csv"
    metrics = pd.read_csv(metrics_path) if metrics_path.is_file() else pd.DataFrame()
    stats = _json(path / "stats.json")
    hydra = _yaml(path / ".hydra" / "hydra.yaml") or {}
    choices = (hydra.get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
    run = Run(
        path=path,
        config=_yaml(path / ".hydra" / "config.yaml") or {},
        overrides=[str(o) for o in _yaml(path / ".hydra" / "overrides.yaml") or []],
        metrics=metrics,
        stats=stats,
        simulated=bool(_flag(path, stats)),
        choices={str(k): str(v) for k, v in choices.items() if v is not None},
    )
    if _flag(path, stats) is None and run.records_path.is_file():
        run.simulated = any(r.simulated for r in records.read(run.records_path))
    return run


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
    """The run directory under `root` (searched recursively) whose metrics.csv is newest."""
    root = Path(root)
    found = [p.parent for p in root.rglob("metrics.csv")] if root.is_dir() else []
    if not found:
        raise NoRunsError(f"no run directory under {root}; run `python run.py` first")
    return max(found, key=lambda p: (p / "metrics.csv").stat().st_mtime)


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
