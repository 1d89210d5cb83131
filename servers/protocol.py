"""Wire protocol v1 of the SAM executor server, as pydantic models (they generate /openapi.json).

Semantic checks that need the image (tolerance, clipping, NaN) live in `servers.prompts`, so a
structurally valid but semantically bad prompt can become a per-prompt error (`strict=false`).
The protocol is described for humans in servers/README.md; keep the two in step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1

MAX_TEXT_CHARS = 1000
"""Longer text is no noun phrase; it is rejected rather than silently truncated."""

SHA256_PATTERN = r"^[0-9a-f]{64}$"


IMAGE_REF_ONE_OF: list[dict[str, Any]] = [
    {"title": "by bytes", "required": ["b64"],
     "properties": {"b64": {"type": "string"}, "sha256": {"type": "null"}}},
    {"title": "by digest", "required": ["sha256"],
     "properties": {"sha256": {"type": "string"}, "b64": {"type": "null"}}},
]
"""The "exactly one of b64 / sha256" rule of `ImageRef._exactly_one`, as JSON Schema, so
/openapi.json states what the validator enforces (the other one may be absent or null)."""


class ImageRef(BaseModel):
    """The image: its encoded bytes, or the pixel digest of one the server holds."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": IMAGE_REF_ONE_OF})

    b64: str | None = Field(
        default=None,
        description="base64 of an encoded image file, PNG, JPEG, WebP, BMP or TIFF (no other "
        "format is decoded); decoded to RGB, EXIF orientation not applied",
    )
    sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="rescue.sample.image_digest of the decoded (H, W, 3) uint8 RGB pixels of an "
        "image sent earlier; 404 image_not_found when the server no longer holds it",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.b64 is None) == (self.sha256 is None):
            raise ValueError("image needs exactly one of 'b64' or 'sha256'")
        return self


class PromptIn(BaseModel):
    """One prompt in pixels of the image. Shapes are checked here, values in servers.prompts."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS,
                             description="a noun phrase; empty = none")
    box: list[float] | None = Field(default=None, description="[x1, y1, x2, y2] in pixels")
    points: list[list[float]] = Field(default_factory=list, description="[[x, y], ...] in pixels")
    point_labels: list[int] = Field(default_factory=list,
                                    description="one per point: 1 foreground, 0 background")


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: ImageRef
    prompts: list[PromptIn] = Field(min_length=1, description="one result per prompt, in order")
    multimask: bool = Field(default=False, description="SAM-style several masks for point/box "
                                                       "prompts")
    max_instances: int | None = Field(default=None, ge=1, le=256,
                                      description="at most this many instances per prompt")
    strict: bool = Field(default=True, description="an invalid prompt rejects the request (422) "
                                                   "instead of becoming a per-prompt error")


class RleOut(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE counts (ASCII)")


class InstanceOut(BaseModel):
    rle: RleOut
    score: float = Field(description="backend confidence in [0, 1]")
    box: list[float] | None = Field(description="tight box of the mask, [x1, y1, x2, y2], "
                                                "exclusive max edge; null for an empty mask")


class PromptResultOut(BaseModel):
    instances: list[InstanceOut] = Field(description="best score first")
    error: str | None = Field(default=None, description="why the prompt could not be run")


class SegmentResponse(BaseModel):
    image_sha256: str
    width: int
    height: int
    image_cached: bool = Field(description="the encoding came from the LRU (no encoder pass)")
    results: list[PromptResultOut]
    backend: str
    model: str
    timing_ms: dict[str, float]


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "error"]
    backend: str
    ready: bool
    error: str | None = None


class InfoResponse(BaseModel):
    protocol: int = PROTOCOL_VERSION
    backend: str
    model: str
    version: str = Field(description="version of this server")
    backend_version: str
    device: str
    capabilities: dict[str, bool]
    identity: dict[str, Any] = Field(description="everything about the backend that can change a "
                                                 "mask; clients hash it into cache keys")
    max_prompts: int
    max_points: int
    max_image_side: int
    max_image_pixels: int
    max_body_bytes: int
    max_instances: int
    box_tolerance: float
    image_cache_size: int
    max_uploads: int = Field(description="request bodies read at once; more get 503 overloaded")
    body_timeout_s: float = Field(description="a body must arrive within this, else 408")
    stats: dict[str, int | float]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="machine-readable: unauthorized, image_not_found, "
                                  "body_too_large, image_too_large, too_many_prompts, "
                                  "invalid_request, invalid_image, invalid_prompts, overloaded, "
                                  "not_ready, backend_error")
    message: str


class ErrorResponse(BaseModel):
    detail: ErrorDetail
