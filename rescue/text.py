"""Text that must travel as UTF-8 JSON: a planner's label, a dataset's query.

A Python string may hold what UTF-8 cannot encode: lone surrogates (U+D800-U+DFFF), the only
such code points. JSON's "\\ud800" escape decodes to one (the planner's parser and the datasets
read JSON with Python's json), and so do bytes that were not UTF-8 read with
`surrogateescape` (argv, file names). A request carrying one cannot be sent, and sending it
again gives the same failure: it fails only what carries it, as a permanent answer
(`execute:bad_text`, `plan:bad_text`, `verify:bad_text`), never as a transient error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")
_DATA_URL = "data:image/"
CONTEXT_CHARS = 20
"""Characters shown on each side of the first bad one in a reason."""


def unencodable(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8, in ASCII (where, and the text around), or None."""
    bad = _SURROGATE.search(text)
    if bad is None:
        return None
    at = bad.start()
    around = text[max(0, at - CONTEXT_CHARS): at + CONTEXT_CHARS + 1]
    return (f"lone surrogate {bad.group()!a} at character {at} of {len(text)}, "
            f"not encodable as UTF-8: {around!a}")


def first_unencodable(value: Any) -> str | None:
    """`unencodable` of the first bad string (keys included) in a JSON-like value, or None.

    Image data URLs are skipped: base64 is ASCII by construction, and scanning megabytes of it
    on the event loop for every request costs tens of milliseconds."""
    if isinstance(value, str):
        return None if value.startswith(_DATA_URL) else unencodable(value)
    if value is None or isinstance(value, int | float):  # most of a request: no ABC check
        return None
    if isinstance(value, list | tuple):
        for v in value:
            why = first_unencodable(v)
            if why is not None:
                return why
    elif isinstance(value, Mapping):
        for k, v in value.items():
            why = first_unencodable(k) or first_unencodable(v)
            if why is not None:
                return why
    return None


def replaced(text: str) -> str:
    """`text` with every unencodable character as U+FFFD: as long, and always encodable."""
    return _SURROGATE.sub("\ufffd", text)
