"""The SAM executor server: FastAPI over a `SegmenterBackend` (protocol: servers/README.md).

    python -m servers.sam_server --backend classical --host 127.0.0.1 --port 8001 [--token T]

Each request is decoded once, its image encoded once (or taken from the LRU by pixel digest),
and all its prompts answered against that one encoding. Admission is bounded: `max_in_flight`
requests run, `max_queued` wait, the rest get 503 at once; a client backs off and retries,
and the server's memory stays bounded under any load. In front of it all, `servers.gate`
refuses strangers from the headers and reads bodies in bounded slots, with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import resource
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from rescue.images import ImageError, ImageLimits, decode
from rescue.sample import image_digest
from servers import __version__
from servers.backends import SegmenterBackend, SegmentOptions, make_backend
from servers.errors import ApiError
from servers.gate import Gate, GateSettings, GateStats
from servers.image_cache import CachedImage, ImageCache
from servers.images import decode_b64
from servers.prompts import PromptInvalid, validate_prompt
from servers.protocol import (
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    InstanceOut,
    PromptResultOut,
    RleOut,
    SegmentRequest,
    SegmentResponse,
)

log = logging.getLogger("servers.sam_server")

TOKEN_ENV = "SAM_SERVER_TOKEN"


@dataclass(frozen=True)
class ServerSettings:
    """Limits and sizes of one server; all reported by /v1/info."""

    host: str = "127.0.0.1"
    port: int = 8001
    token: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = ImageLimits.max_pixels
    max_image_side: int = ImageLimits.max_side
    max_prompts: int = 256
    max_points: int = 64
    max_instances: int = 16
    box_tolerance: float = 0.05
    image_cache_size: int = 8
    max_in_flight: int = 2
    max_queued: int = 8
    max_uploads: int = 4
    body_timeout_s: float = 60.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_queued < 0:
            raise ValueError("max_in_flight >= 1 and max_queued >= 0 required")
        if self.max_uploads < 1 or not self.body_timeout_s > 0:
            raise ValueError("max_uploads >= 1 and body_timeout_s > 0 required")
        if not 0.0 <= self.box_tolerance <= 1.0:
            raise ValueError("box_tolerance is a fraction of the image side, in [0, 1]")


@dataclass
class _Stats:
    requests: int = 0
    prompts: int = 0
    masks: int = 0
    rejected_overload: int = 0
    in_flight: int = 0
    queued: int = 0


@dataclass
class _Runtime:
    backend: SegmenterBackend
    settings: ServerSettings
    cache: ImageCache
    stats: _Stats = field(default_factory=_Stats)
    gate: GateStats = field(default_factory=GateStats)
    ready: bool = False
    load_error: str | None = None
    slots: asyncio.Semaphore | None = None


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


_BEARER = HTTPBearer(auto_error=False, description="required when the server has a token")


async def _authorize(request: Request,
                     creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
                     ) -> None:
    # module level: FastAPI resolves these annotations in the module's namespace. The Gate has
    # refused strangers before the body was read; this documents the scheme in /openapi.json
    # and checks again for an app mounted without the Gate
    token = request.app.state.runtime.settings.token
    if token is None:
        return
    given = creds.credentials if creds is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                       headers={"WWW-Authenticate": "Bearer"})


_ERRORS = {
    401: {"model": ErrorResponse, "description": "unauthorized"},
    404: {"model": ErrorResponse, "description": "image_not_found"},
    408: {"model": ErrorResponse, "description": "body_timeout"},
    413: {"model": ErrorResponse, "description": "body_too_large, image_too_large, "
                                                 "too_many_prompts"},
    422: {"model": ErrorResponse, "description": "invalid_request, invalid_image, invalid_prompts"},
    500: {"model": ErrorResponse, "description": "backend_error"},
    503: {"model": ErrorResponse, "description": "overloaded (requests or uploads), not_ready"},
}


def create_app(backend: SegmenterBackend, settings: ServerSettings | None = None) -> FastAPI:
    """The app around `backend`; the backend loads in a thread at startup (see /health)."""
    settings = settings or ServerSettings()
    rt = _Runtime(backend=backend, settings=settings, cache=ImageCache(settings.image_cache_size))
    limits = ImageLimits(settings.max_image_pixels, settings.max_image_side)

    async def _load() -> None:
        try:
            await asyncio.to_thread(backend.load)
            rt.ready = True
            log.info("backend %s ready", backend.name)
        except Exception as exc:
            rt.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("backend %s failed to load", backend.name)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        rt.slots = asyncio.Semaphore(settings.max_in_flight)
        task = asyncio.create_task(_load())
        yield
        if not task.done():
            task.cancel()

    app = FastAPI(
        title="RESCue SAM executor server",
        version=__version__,
        description="Segment an image from text/box/point prompts; masks as COCO RLE. "
                    "Protocol: servers/README.md.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.add_middleware(Gate, settings=GateSettings(
        token=settings.token, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
        max_uploads=settings.max_uploads, retry_after_s=settings.retry_after_s), stats=rt.gate)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, nested too deep)
            return ApiError(422, "invalid_request",
                            f"request body cannot be read as JSON: {exc.detail}").response()
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b[:64].decode(
            "utf-8", "replace")})
        for e in errors:  # never echo a 50 MB base64 string back
            if isinstance(e.get("input"), str | dict | list) and len(str(e["input"])) > 200:
                e["input"] = str(e["input"])[:200] + "..."
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return ApiError(422, "invalid_request",
                        f"request does not match the schema: {where}: {first.get('msg', '')}",
                        errors=errors).response()

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        if rt.load_error is not None:
            body = HealthResponse(status="error", backend=backend.name, ready=False,
                                  error=rt.load_error)
            return JSONResponse(body.model_dump(), status_code=503)
        body = HealthResponse(status="ok" if rt.ready else "loading", backend=backend.name,
                              ready=rt.ready)
        return JSONResponse(body.model_dump())

    @app.get("/v1/info", response_model=InfoResponse, responses={401: _ERRORS[401]},
             dependencies=[Depends(_authorize)])
    async def info() -> InfoResponse:
        bi = backend.info()
        s = rt.stats
        stats = {"requests": s.requests, "prompts": s.prompts, "masks": s.masks,
                 "encodes": rt.cache.encodes, "cache_hits": rt.cache.hits,
                 "cached_images": len(rt.cache), "in_flight": s.in_flight, "queued": s.queued,
                 "rejected_overload": s.rejected_overload, "uploads": rt.gate.uploads,
                 "rejected_uploads": rt.gate.rejected_uploads,
                 "body_timeouts": rt.gate.body_timeouts, "unauthorized": rt.gate.unauthorized,
                 "peak_rss_mb": _peak_rss_mb()}
        return InfoResponse(
            backend=bi.backend, model=bi.model, version=__version__,
            backend_version=bi.backend_version, device=bi.device, capabilities=bi.capabilities,
            identity=bi.identity, max_prompts=settings.max_prompts,
            max_points=settings.max_points, max_image_side=settings.max_image_side,
            max_image_pixels=settings.max_image_pixels, max_body_bytes=settings.max_body_bytes,
            max_instances=settings.max_instances, box_tolerance=settings.box_tolerance,
            image_cache_size=settings.image_cache_size, max_uploads=settings.max_uploads,
            body_timeout_s=settings.body_timeout_s, stats=stats)

    def _resolve_image(req: SegmentRequest) -> tuple[CachedImage, bool, float, float]:
        t0 = time.perf_counter()
        if req.image.sha256 is not None:
            entry = rt.cache.get(req.image.sha256)
            if entry is None:
                raise ApiError(404, "image_not_found",
                               "the server does not hold this image (evicted or never sent): "
                               "re-send it as image.b64", sha256=req.image.sha256)
            return entry, True, (time.perf_counter() - t0) * 1e3, 0.0
        assert req.image.b64 is not None
        try:
            pixels = decode(decode_b64(req.image.b64), limits, what="image.b64")
        except ImageError as exc:
            if exc.code == "too_large":
                raise ApiError(413, "image_too_large", str(exc), width=exc.width,
                               height=exc.height, limit_pixels=limits.max_pixels,
                               limit_side=limits.max_side) from exc
            raise ApiError(422, "invalid_image", str(exc)) from exc
        digest = image_digest(pixels)
        t1 = time.perf_counter()
        try:
            entry, cached = rt.cache.get_or_encode(digest, pixels, backend.encode)
        except Exception as exc:
            log.exception("encode failed")
            raise ApiError(500, "backend_error",
                           f"image encoder failed: {type(exc).__name__}: {exc}") from exc
        t2 = time.perf_counter()
        return entry, cached, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def _run(req: SegmentRequest, t_start: float) -> SegmentResponse:
        entry, cached, t_decode, t_encode = _resolve_image(req)
        prompts: list[Any] = []
        invalid: list[dict[str, Any]] = []
        for i, p in enumerate(req.prompts):
            try:
                prompts.append(validate_prompt(p, entry.width, entry.height,
                                               settings.box_tolerance, settings.max_points))
            except PromptInvalid as exc:
                prompts.append(None)
                invalid.append({"index": i, "message": str(exc)})
        if invalid and req.strict:
            raise ApiError(422, "invalid_prompts",
                           f"{len(invalid)} of {len(req.prompts)} prompts are invalid; first: "
                           f"prompt {invalid[0]['index']}: {invalid[0]['message']}",
                           errors=invalid)
        runnable = [p for p in prompts if p is not None]
        options = SegmentOptions(multimask=req.multimask,
                                 max_instances=req.max_instances or settings.max_instances)
        t3 = time.perf_counter()
        try:
            answers = backend.segment(entry.state, runnable, options) if runnable else []
        except Exception as exc:
            log.exception("segment failed")
            raise ApiError(500, "backend_error",
                           f"backend failed: {type(exc).__name__}: {exc}") from exc
        if len(answers) != len(runnable):
            raise ApiError(500, "backend_error",
                           f"backend returned {len(answers)} results for {len(runnable)} prompts")
        t4 = time.perf_counter()
        errors = {e["index"]: e["message"] for e in invalid}
        it = iter(answers)
        results = []
        n_masks = 0
        for i, p in enumerate(prompts):
            if p is None:
                results.append(PromptResultOut(instances=[], error=f"invalid prompt: {errors[i]}"))
                continue
            ans = next(it)
            insts = sorted(ans.instances, key=lambda x: -x.score)[: options.max_instances]
            n_masks += len(insts)
            results.append(PromptResultOut(
                instances=[InstanceOut(rle=RleOut(size=list(x.rle["size"]),
                                                  counts=str(x.rle["counts"])),
                                       score=float(x.score),
                                       box=list(x.box) if x.box is not None else None)
                           for x in insts],
                error=ans.error))
        rt.stats.prompts += len(req.prompts)
        rt.stats.masks += n_masks
        total = (time.perf_counter() - t_start) * 1e3
        return SegmentResponse(
            image_sha256=entry.sha256, width=entry.width, height=entry.height,
            image_cached=cached, results=results, backend=backend.name,
            model=backend.info().model,
            timing_ms={"decode": round(t_decode, 3), "encode": round(t_encode, 3),
                       "segment": round((t4 - t3) * 1e3, 3), "total": round(total, 3)})

    @app.post("/v1/segment", response_model=SegmentResponse, responses=_ERRORS,
              dependencies=[Depends(_authorize)])
    async def segment(req: SegmentRequest) -> SegmentResponse:
        t_start = time.perf_counter()
        rt.stats.requests += 1
        if not rt.ready:
            why = f"failed to load: {rt.load_error}" if rt.load_error else "still loading"
            raise ApiError(503, "not_ready", f"backend {backend.name} is {why}",
                           headers={"Retry-After": str(settings.retry_after_s)})
        if len(req.prompts) > settings.max_prompts:
            raise ApiError(413, "too_many_prompts",
                           f"{len(req.prompts)} prompts, at most {settings.max_prompts} a request",
                           count=len(req.prompts), limit=settings.max_prompts)
        s = rt.stats
        if s.in_flight + s.queued >= settings.max_in_flight + settings.max_queued:
            s.rejected_overload += 1
            raise ApiError(503, "overloaded",
                           f"{s.in_flight} requests running and {s.queued} waiting: retry later",
                           headers={"Retry-After": str(settings.retry_after_s)},
                           retry_after=settings.retry_after_s)
        assert rt.slots is not None
        s.queued += 1
        try:
            await rt.slots.acquire()
        finally:
            s.queued -= 1
        s.in_flight += 1
        try:
            return await asyncio.to_thread(_run, req, t_start)
        finally:
            s.in_flight -= 1
            rt.slots.release()

    return app


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option wants key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    d = ServerSettings()
    p = argparse.ArgumentParser(prog="python -m servers.sam_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="classical",
                   help="classical | sam3 | hf | package.module:factory (default: classical)")
    p.add_argument("--option", "-o", action="append", type=_parse_option, default=[],
                   metavar="KEY=VALUE", help="backend keyword argument (JSON value or string); "
                                             "repeatable, e.g. -o device=cuda")
    p.add_argument("--host", default=d.host, help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on /v1/* (or set ${TOKEN_ENV}; "
                        "the variable keeps it out of the process list)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-image-side", type=int, default=d.max_image_side)
    p.add_argument("--max-prompts", type=int, default=d.max_prompts)
    p.add_argument("--max-points", type=int, default=d.max_points)
    p.add_argument("--max-instances", type=int, default=d.max_instances)
    p.add_argument("--box-tolerance", type=float, default=d.box_tolerance)
    p.add_argument("--image-cache-size", type=int, default=d.image_cache_size)
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight)
    p.add_argument("--max-queued", type=int, default=d.max_queued)
    p.add_argument("--max-uploads", type=int, default=d.max_uploads,
                   help="request bodies read at once; more get 503 (default %(default)s)")
    p.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help="a request body must arrive within this many seconds, else 408 "
                        "(default %(default)s)")
    p.add_argument("--log-level", default="info")
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    token = args.token if args.token else os.environ.get(TOKEN_ENV) or None
    names = {f for f in asdict(ServerSettings())} - {"token", "retry_after_s"}
    return ServerSettings(token=token, **{n: getattr(args, n) for n in names})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    backend = make_backend(args.backend, dict(args.option))
    app = create_app(backend, settings)
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.token is None:
        log.warning("binding %s without a token: anyone who can reach the port can use it",
                    settings.host)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
