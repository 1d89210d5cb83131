"""A run directory, the one idea of it that merge, re-evaluation and the analysis tools share.

A run directory is where `python run.py` ran one job: Hydra's `.hydra/config.yaml` is there from
the start, `records.jsonl` and `metrics.csv` once it has results. A multirun (sweep) directory
holds run directories below it (Hydra numbers its jobs 0, 1, ...). A `mode=evaluate` run has
metrics but no records of its own: they are its `records_from`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rescue import records
from rescue.errors import UserError
from rescue.records import SampleRecord

MARKERS = (".hydra/config.yaml", "records.jsonl", "metrics.csv")
"""A directory holding any of these is a run directory."""


class NoRunsError(UserError, ValueError):
    """A source holds no run directory."""


def _yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _file(*parts: str, doc: str) -> property:
    """A RunDir property: the path of one of its files."""
    def path(self: RunDir) -> Path:
        return self.path.joinpath(*parts)
    return property(path, doc=doc)


@dataclass(frozen=True)
class RunDir:
    """Where each file of one run directory is, and its saved config."""

    path: Path

    records_file = _file("records.jsonl", doc="Every candidate of every sample, sorted.")
    partial_records_file = _file("records.partial.jsonl", doc=(
        "Records appended as samples finish; what a killed or stopped run leaves behind."))
    masks_file = _file("masks.jsonl", doc=(
        "Each sample's ground truth (RLE, with its ignore region) and distinct masks "
        "(`rescue.truth`): what aggregators read, so a copied run evaluates alone."))
    metrics_file = _file("metrics.csv", doc="Every (subset, estimator, selector, N).")
    stats_file = _file("stats.json", doc="Model calls, cache hits, endpoints, identities.")
    summary_file = _file("summary.json", doc="The headline numbers and failure counts.")
    resolved_config_file = _file("config_resolved.yaml", doc=(
        "The config as the run resolved it (what made its metrics.csv)."))
    hydra_config_file = _file(".hydra", "config.yaml", doc=(
        "Hydra's composed config, interpolations unresolved."))
    hydra_file = _file(".hydra", "hydra.yaml", doc="Hydra's own settings of the job.")
    overrides_file = _file(".hydra", "overrides.yaml", doc="The command-line overrides.")
    failed_file = _file("FAILED", doc=(
        "The one line a run ended on when the user can fix its cause (`rescue.app`)."))

    def is_run(self) -> bool:
        return self.path.is_dir() and any((self.path / m).is_file() for m in MARKERS)

    def failed(self) -> bool:
        """The run ended on a user error before it had results: not part of any study."""
        return self.failed_file.is_file()

    def mark_failed(self, message: str) -> None:
        if self.path.is_dir():
            self.failed_file.write_text(message + "\n", encoding="utf-8")

    def config(self) -> dict[str, Any]:
        """`.hydra/config.yaml` as saved ({} when there is none)."""
        return _yaml(self.hydra_config_file) or {}

    def resolved_config(self) -> dict[str, Any] | None:
        return _yaml(self.resolved_config_file)

    def overrides(self) -> list[str]:
        """The command-line overrides Hydra saved."""
        return [str(o) for o in _yaml(self.overrides_file) or []]

    def choices(self) -> dict[str, str]:
        """The option Hydra picked for each config group (`verifier` -> `simulated`)."""
        hydra = _yaml(self.hydra_file) or {}
        picked = (hydra.get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
        return {str(k): str(v) for k, v in picked.items() if v is not None}

    @property
    def mode(self) -> str:
        return str(self.config().get("mode", "run"))

    @property
    def launch_dir(self) -> Path | None:
        """Where the run was launched (Hydra's `hydra.runtime.cwd`): what the relative paths
        of its command line meant. None where Hydra saved no hydra.yaml."""
        hydra = _yaml(self.hydra_file) or {}
        cwd = ((hydra.get("hydra") or {}).get("runtime") or {}).get("cwd")
        return Path(str(cwd)) if cwd else None

    def resolve(self, path: str | Path) -> Path:
        """A path of the run's config as the run meant it: a relative one against its launch
        directory, not against wherever it is read back from."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        base = self.launch_dir
        return base / p if base is not None else p

    @property
    def records_source(self) -> Path:
        """The run's records; a `mode=evaluate` run has none and reads its `records_from`'s
        (resolved against the evaluate run's launch directory; through a chain of evaluate
        runs to the one that has them)."""
        run, seen = self, set()
        while not run.records_file.is_file() and run.path not in seen:
            seen.add(run.path)
            config = run.config()
            source = config.get("records_from")
            if config.get("mode") != "evaluate" or not source:
                break
            run = RunDir(run.resolve(str(source)))
        return run.records_file

    @property
    def masks_source(self) -> Path:
        """The `masks.jsonl` beside `records_source`."""
        return self.records_source.with_name(self.masks_file.name)

    def records(self) -> list[SampleRecord]:
        path = self.records_source
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return list(records.read(path))


def _order(path: Path, root: Path) -> tuple[tuple[int, int | str], ...]:
    """Numbered job directories (0, 1, ..., 10) in numeric order, then the others by name."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in path.relative_to(root).parts)


def _runs_below(root: Path) -> list[Path]:
    found = {f.parent for m in MARKERS for f in root.rglob(m)}
    found = {d.parent if d.name == ".hydra" else d for d in found} - {root}
    return sorted(found, key=lambda d: _order(d, root))


def find_runs(sources: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run directories of each source: itself when it is a run, else the runs below it.

    Sources keep their order, jobs of a multirun their numeric order; a run named twice is
    listed once; a failed run (`RunDir.failed`) is left out. A source that is missing or holds
    no run is a `NoRunsError` naming it.
    """
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    found: list[Path] = []
    for src in items:
        path = Path(src)
        if not path.is_dir():
            raise NoRunsError(f"{path} is neither a run nor a multirun directory: no such "
                              "directory")
        runs = [path] if RunDir(path).is_run() else _runs_below(path)
        runs = [r for r in runs if not RunDir(r).failed()]
        if not runs:
            raise NoRunsError(
                f"{path} holds no run: no Hydra run directories below it (a run directory has "
                f"{', '.join(MARKERS)}; a multirun directory has run directories below it)")
        found += [r.resolve() for r in runs]
    return list(dict.fromkeys(found))
