"""What the user can fix: a run that ends with one of these says so in one line (`rescue: …`),
with no traceback, and marks its run directory failed (`rescue.app`). Anything else is a defect
and keeps its traceback. `HYDRA_FULL_ERROR=1` gives the traceback of either."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the config, the data or the endpoints, not with RESCue."""


class ConfigError(UserError, ValueError):
    """A config value is out of range or inconsistent; the message names the key and the fix."""
