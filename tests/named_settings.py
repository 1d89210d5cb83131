"""The evaluation called with selectors by name, as the tests state their inputs.

`settings_of` resolves the names through the registry and builds `EvaluationSettings`, which
checks them: a bad name, grid or level fails there exactly as it would from a config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from rescue import selection
from rescue.evaluation import evaluate, per_sample_table
from rescue.records import SampleRecord
from rescue.settings import EvaluationSettings


def settings_of(n_grid: Sequence[int], selectors: Sequence[str], primary: str | None = None,
                **kw: Any) -> EvaluationSettings:
    """Settings naming the selectors; the primary defaults to the first of them."""
    chosen = selection.named(selectors)
    head = selection.get(primary) if primary is not None else next(iter(chosen), None)
    return EvaluationSettings(n_grid=tuple(n_grid), selectors=chosen,
                              primary=head or selection.VERIFIER, **kw)


def evaluate_named(records: Sequence[SampleRecord], n_grid: Sequence[int],
                   selectors: Sequence[str], by_tag: bool = True, **kw: Any) -> pd.DataFrame:
    return evaluate(records, settings_of(n_grid, selectors, **kw), by_tag=by_tag)


def per_sample_named(records: Sequence[SampleRecord], n: int, selector: str,
                     estimator: str = "best_of_n", **kw: Any) -> pd.DataFrame:
    settings = settings_of([1], [selector], **kw)
    return per_sample_table(records, settings, n, selection.get(selector), estimator=estimator)
