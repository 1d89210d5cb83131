"""From a composed Hydra config to a finished run directory: `mode=` picks the module that
does the work (`rescue.modes`); this is the one place that knows them all.

A run that ends on a `UserError` (config, data, endpoints: what the user can fix) or a model or
dataset config that cannot be built prints one line, writes it to the run's log and leaves a
`FAILED` file in its run directory, which the analysis tools skip. `HYDRA_FULL_ERROR=1` prints
the traceback before that line.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig

from rescue.errors import ConfigError, UserError
from rescue.failures import RunAborted
from rescue.modes import evaluate, infer, merge, run
from rescue.run_dir import RunDir

MODES: dict[str, Callable[[DictConfig], float | None]] = {
    "run": run.main, "evaluate": evaluate.main, "infer": infer.main, "merge": merge.main}
"""Each mode's entry point; it returns the number a sweeper optimises (or None)."""

log = logging.getLogger("rescue")


def describe(exc: BaseException) -> str:
    """What the user reads: a user error's own message (one line, or a short block such as
    preflight's one line per problem); for Hydra's instantiation errors the config key and the
    cause, without the call's repr."""
    if isinstance(exc, InstantiationException):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")),
                   None)
        cause = exc.__cause__
        body = f"{type(cause).__name__}: {cause}" if cause is not None else " ".join(lines[:2])
        return f"cannot build {key or 'an object'} from its config: {body}"
    text = str(exc).strip()
    return f"run stopped: {text}" if isinstance(exc, RunAborted) else text


def _to_log_files(message: str) -> None:
    """The error into the run's log (Hydra's file handler), not twice onto the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main(cfg: DictConfig) -> float | None:
    """Dispatch on `cfg.mode`; a user error ends the run in one line (see the module doc)."""
    out = cfg.get("paths", {}).get("output_dir")
    if out:  # a rerun into the same directory starts unfailed
        RunDir(Path(str(out))).failed_file.unlink(missing_ok=True)
    try:
        mode = str(cfg.mode)
        if mode not in MODES:
            raise ConfigError(f"unknown mode={mode!r}; valid modes: {', '.join(MODES)}")
        return MODES[mode](cfg)
    except (UserError, InstantiationException) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the traceback, then the same line
            traceback.print_exc()
        message = describe(exc)
        _to_log_files(message)
        if out:
            RunDir(Path(str(out))).mark_failed(message)
        raise SystemExit(f"rescue: {message}") from None
