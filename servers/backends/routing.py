"""Which SAM3 path a prompt takes, decided by its parts alone (both SAM3 backends).

SAM3 has two heads: promptable concept segmentation (a noun phrase, optionally with a box as a
positive exemplar; every matching instance) and the SAM1-style interactive predictor (points
and/or a box; one object). The client's `executor.prompt_mode` chooses the parts it sends, so
the parts must choose the path, never a server option: then one mode means one path on every
SAM3 backend (README, "SAM3 prompt modes").
"""

from __future__ import annotations

from typing import Literal

from rescue.hypothesis import Prompt

ROUTING = "text-no-points:concept;else:interactive"
"""This rule, named in each SAM3 backend's identity: a change re-keys cached masks."""


def route(p: Prompt) -> Literal["concept", "interactive"]:
    """'concept' for text without points (a box is its exemplar); else 'interactive' (points,
    or a box without text; any text is not read there)."""
    return "concept" if p.text is not None and not p.points else "interactive"
