"""From a composed Hydra config to a finished run directory: `mode=` picks the module that
does the work (`rescue.modes`); this is the one place that knows them all.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from rescue.modes import evaluate, infer, merge, run

MODES: dict[str, Callable[[DictConfig], float | None]] = {
    "run": run.main, "evaluate": evaluate.main, "infer": infer.main, "merge": merge.main}
"""Each mode's entry point; it returns the number a sweeper optimises (or None)."""


def main(cfg: DictConfig) -> float | None:
    """Dispatch on `cfg.mode`."""
    mode = str(cfg.mode)
    if mode not in MODES:
        raise ValueError(f"unknown mode={mode!r}; valid modes: {', '.join(MODES)}")
    return MODES[mode](cfg)
