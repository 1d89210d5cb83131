"""The experiment-tracker seam: the pipeline logs through this, W&B or nothing behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd

from rescue.reporting.overlays import OverlayItem


@runtime_checkable
class Logger(Protocol):
    """A run's tracker. Implementations never raise: tracking must not cost a finished run."""

    def start(self, config: Mapping[str, Any], name: str, tags: Sequence[str] = (),
              simulated: bool = False) -> None:
        """Open the run with the resolved config; `simulated` runs are tagged so."""

    def log_metrics(self, metrics: pd.DataFrame) -> None:
        """The (estimator, selector, N) table, and IoU-vs-N series."""

    def log_images(self, images: Mapping[str, Path]) -> None:
        """PNG files (plots, overlay sheets) by name."""

    def log_overlays(self, items: Sequence[OverlayItem]) -> None:
        """Samples with their masks as toggleable layers, where the tracker supports it."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Headline numbers (gIoU@1, gIoU@max, oracle@max ...)."""

    def finish(self) -> None:
        """Close the run; safe to call twice."""


class NullLogger:
    """Logs nothing: `logger=none`, and the default for library callers and tests."""

    def start(self, config: Mapping[str, Any], name: str, tags: Sequence[str] = (),
              simulated: bool = False) -> None:
        return None

    def log_metrics(self, metrics: pd.DataFrame) -> None:
        return None

    def log_images(self, images: Mapping[str, Path]) -> None:
        return None

    def log_overlays(self, items: Sequence[OverlayItem]) -> None:
        return None

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        return None

    def finish(self) -> None:
        return None
