"""Evaluation settings: what a run evaluates and how, read from the config once and checked once.

`EvaluationSettings.from_config` is the one place that reads `n_grid`, `seed`, `max_n` and
`selection.*`; the run, re-evaluation, merge, inference and the analysis tools all build their
settings there (the analysis from a run's saved `config_resolved.yaml`), so a run and a
re-scoring of it cannot disagree on a default. A key missing from an older run's config takes
the field's default below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rescue import aggregation, policies, selection
from rescue.aggregation import Aggregator
from rescue.consensus import Draws
from rescue.cost import CostRates
from rescue.errors import ConfigError
from rescue.estimators import ESTIMATORS
from rescue.selection import Selector


def default_n_grid(max_n: int) -> tuple[int, ...]:
    """The N evaluated when `n_grid` is not given: the powers of two below `max_n`, and
    `max_n` (the seed's `--max_n 64`: 1, 2, 4, ..., 64; `max_n=24`: 1, 2, 4, 8, 16, 24)."""
    return (*(1 << k for k in range(max_n.bit_length()) if 1 << k < max_n), max_n)


@dataclass(frozen=True)
class EvaluationSettings:
    """`n_grid` (sorted, distinct, each in 1..`max_n`; `max_n` None where the records' pools
    bound N instead), the selectors evaluated and the `primary` one among them (the headline
    number and the single answer), the estimators, `bootstrap` resamples for the intervals at
    level `ci`, the `seed` of resamples and draws; consensus within subsets (`rescue.consensus`)
    enumerates where there are at most `consensus_draws` subsets, else draws `consensus_pilot`
    first (at most `consensus_draws`; `consensus_draws` where `consensus_se` is 0) and more
    until the gIoU over all samples has a Monte-Carlo standard error of at most
    `consensus_se`, never more than `consensus_max_draws` a sample (the arena and listwise
    draw `consensus_draws`); the verification policies that draw subsets (`rescue.policies`)
    use the same draws.
    `aggregators` (`rescue.aggregation`, none by default) output masks of their own; they need
    the run's stored truth and masks. `cost`: the user's conversion of each model's work to
    GPU-seconds (config `cost.*`), read by the cost columns only, so a cached rerun re-costs a
    study with no model call."""

    n_grid: tuple[int, ...]
    selectors: tuple[Selector, ...] = selection.DEFAULTS
    primary: Selector = selection.VERIFIER
    estimators: tuple[str, ...] = ESTIMATORS
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    consensus_draws: int = 256
    consensus_pilot: int = 32
    consensus_se: float = 0.002
    consensus_max_draws: int = 65536
    max_n: int | None = None
    aggregators: tuple[Aggregator, ...] = ()
    cost: CostRates = field(default_factory=CostRates)

    def __post_init__(self) -> None:
        grid = sorted({int(n) for n in self.n_grid})
        if not grid or grid[0] < 1:
            raise ConfigError(f"n_grid must hold integers >= 1, got {list(self.n_grid)}")
        if self.max_n is not None and grid[-1] > self.max_n:
            bad = [n for n in grid if n > self.max_n]
            raise ConfigError(f"n_grid values {bad} are outside 1..max_n={self.max_n}")
        object.__setattr__(self, "n_grid", tuple(grid))
        object.__setattr__(self, "selectors", tuple(self.selectors))
        object.__setattr__(self, "aggregators", tuple(self.aggregators))
        object.__setattr__(self, "estimators", tuple(str(e) for e in self.estimators))
        if not self.selectors:
            raise ConfigError("no selectors to evaluate")
        names = [s.name for s in self.selectors]
        methods = names + [a.name for a in self.aggregators]
        twice = sorted({n for n in methods if methods.count(n) > 1})
        if twice:
            raise ConfigError(f"selectors {twice} are listed twice")
        for name in self.estimators:
            if name not in ESTIMATORS:
                raise ConfigError(
                    f"unknown estimator {name!r}; valid estimators: {', '.join(ESTIMATORS)}")
        if self.primary not in self.selectors:
            raise ConfigError(f"primary selector {self.primary.name!r} is not among the "
                             f"evaluated selectors ({', '.join(names)})")
        if not 0 < self.ci < 1:
            raise ConfigError(f"ci must be in (0, 1), got {self.ci}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap must be >= 0 resamples, got {self.bootstrap}")
        if self.consensus_draws < 2:
            raise ConfigError(f"consensus_draws must be >= 2, got {self.consensus_draws}")
        if self.consensus_pilot < 2:
            raise ConfigError(f"consensus_pilot must be >= 2, got {self.consensus_pilot}")
        if self.consensus_se < 0:
            raise ConfigError(f"consensus_se must be >= 0, got {self.consensus_se}")
        if self.consensus_max_draws < self.consensus_draws:
            raise ConfigError(f"consensus_max_draws ({self.consensus_max_draws}) must be >= "
                             f"consensus_draws ({self.consensus_draws})")

    def draws(self, num_samples: int) -> Draws:
        """Consensus draws for an evaluation of `num_samples` samples: a per-sample Monte-Carlo
        variance of `num_samples * consensus_se**2` gives the mean over them a standard error
        of `consensus_se` (the variances of the samples' independent draws add, over S²)."""
        return Draws(self.consensus_draws, num_samples * self.consensus_se ** 2,
                     self.consensus_max_draws, self.consensus_pilot)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, bounded: bool = True) -> EvaluationSettings:
        """The settings of a composed (or saved) run config. `bounded`: N may not exceed the
        config's `max_n`; re-evaluating records whose pools another run generated is not."""
        max_n = cfg.get("max_n")
        if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, int)
                                  or max_n < 1):
            raise ConfigError(f"max_n must be an integer >= 1 (hypotheses per sample), got "
                              f"{max_n!r}")
        grid = cfg.get("n_grid")
        if grid is None:
            if max_n is None:
                raise ConfigError("the config has neither n_grid nor max_n")
            grid = default_n_grid(max_n)
        sel = cfg.get("selection") or {}
        kw: dict[str, Any] = {}
        if sel.get("selectors") is not None:
            kw["selectors"] = selection.named(
                list(sel["selectors"]), policies.PolicyParams.from_config(sel.get("policy")))
        if sel.get("primary") is not None:
            name = str(sel["primary"])  # a policy as evaluated, with its parameters
            kw["primary"] = next((s for s in kw.get("selectors", ()) if s.name == name),
                                 None) or selection.get(name)
        if sel.get("aggregators"):
            kw["aggregators"] = aggregation.named(
                [str(a) for a in sel["aggregators"]],
                aggregation.AggregationParams.from_config(sel.get("aggregation")))
        if sel.get("estimators") is not None:
            kw["estimators"] = tuple(str(e) for e in sel["estimators"])
        for key, kind in (("bootstrap", int), ("ci", float), ("consensus_draws", int),
                          ("consensus_pilot", int), ("consensus_se", float),
                          ("consensus_max_draws", int)):
            if sel.get(key) is not None:
                kw[key] = kind(sel[key])
        if cfg.get("seed") is not None:
            kw["seed"] = int(cfg["seed"])
        if cfg.get("cost") is not None:
            kw["cost"] = CostRates.from_config(cfg["cost"])
        if bounded:
            if max_n is None:
                raise ConfigError("the config has no max_n")
            kw["max_n"] = int(max_n)
        return cls(n_grid=tuple(int(n) for n in grid), **kw)
