"""The error envelope of the SAM server: `{"detail": {"code", "message", ...extra}}`.

A module of its own so the ASGI gate (servers/gate.py), which answers before FastAPI runs,
speaks the same envelope as the routes; the codes are listed in servers/README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from rescue.records import json_safe


class ApiError(Exception):
    """An error answered as {"detail": {"code", "message", ...extra}}."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> JSONResponse:
        body = {"detail": {"code": self.code, "message": self.message, **self.extra}}
        return JSONResponse(_json_safe(jsonable_encoder(body)), status_code=self.status,
                            headers=self.headers)


def _utf8(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _json_safe(value: Any) -> Any:
    """`value` with what strict JSON cannot carry made printable: an error may echo the client's
    input, which Python's json reads with NaN, Infinity and lone surrogates in it."""
    return json_safe(value, nonfinite=str, text=_utf8)
