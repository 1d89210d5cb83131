"""Executor client for the SAM server (protocol: servers/README.md).

All prompts of one image go in one `POST /v1/segment` (chunked at `max_prompts_per_request`), so
the server encodes the image once. The image travels as lossless PNG the first time; the
server's digest of PNG pixels equals `Sample.image_sha256`, so later requests for the same
image send only the digest, and a `404 image_not_found` (evicted from the server's LRU) is
answered by re-sending the bytes.

SAM3 may return several instances for one prompt (a phrase finds every instance). Which mask a
hypothesis gets is `instance_policy`:
    top1          the best-scoring instance
    union_in_box  union of the instances lying mostly (>= in_box_fraction of their area) inside
                  the prompt's box; top1 when none does or the prompt has no box
    union         union of all instances
An answer with no instance is an empty mask (score 0): the backend looked and found nothing,
which is a result, not a failure. The instances are chosen with the hypothesis's own box in
every prompt mode, sent or not: the planner's box is what localises the one referred object.
A prompt whose text UTF-8 cannot carry (`rescue.text`) is not sent: it is `execute:bad_text`,
a cached answer, and the image's other prompts still go.

Which parts of a hypothesis reach the model is `prompt_mode` (`PROMPT_MODES`); each SAM3 backend
routes a prompt by its parts (servers/README.md), so the mode decides SAM3's path:
    text        the label as a noun phrase: the concept path (every instance of the phrase)
    text_box    the label, with the box as a positive exemplar: the concept path (default)
    box         the box alone: the interactive (SAM1-style) path
    box_points  the box and the planner's point(s): the interactive path
A server whose /v1/info capabilities cannot serve the mode fails the preflight with one line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson

from rescue import masks, text
from rescue.cost import Cost, with_cost
from rescue.hypothesis import Prompt
from rescue.models.http import (
    Endpoint,
    EndpointError,
    RetryPolicy,
    UndecodableReply,
    get_json,
    get_json_sync,
    plain,
)
from rescue.models.transport import HttpClient, Response
from rescue.protocols import Segmentation
from rescue.sample import Sample

log = logging.getLogger("rescue")

INSTANCE_POLICIES = ("top1", "union_in_box", "union")
PROMPT_MODES: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "text_box": ("text", "box"),
    "box": ("box",),
    "box_points": ("box", "points"),
}
"""Each mode's parts of a hypothesis sent to the server (what the model reads)."""
MODE_NEEDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "text_box": ("text",),  # a concept prompt's box is its exemplar: `text` covers it
    "box": ("box",),
    "box_points": ("box", "points"),
}
"""The /v1/info capabilities a server must declare to serve each mode (servers/README.md:
`text` = concept prompts, a phrase with or without a box exemplar; `box` = a box without text;
`points` = point prompts)."""
DEFAULT_PROMPT_MODE = "text_box"
KNOWN_IMAGES = 4096
"""Digests of images this client has sent, remembered to send the digest instead of bytes."""


def is_info(body: Any) -> bool:
    """A SAM server's /v1/info answer (servers/README.md): an object naming its backend."""
    return isinstance(body, dict) and isinstance(body.get("backend"), str)


def is_health(body: Any) -> bool:
    """A SAM server's /health answer: an object saying whether it is ready."""
    return isinstance(body, dict) and isinstance(body.get("ready"), bool)


def png_b64(image: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def mode_parts(mode: str) -> tuple[str, ...]:
    """The parts `mode` sends; a ValueError of one line for an unknown mode."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"executor.prompt_mode must be one of {', '.join(PROMPT_MODES)}; "
                         f"got {mode!r}")
    return PROMPT_MODES[mode]


def mode_unsupported(mode: str, capabilities: Mapping[str, Any] | None) -> str | None:
    """Why a server with these /v1/info `capabilities` cannot serve `mode`, or None."""
    caps = capabilities or {}
    missing = [c for c in MODE_NEEDS[mode] if not caps.get(c)]
    if not missing:
        return None
    served = [m for m, needs in MODE_NEEDS.items() if all(caps.get(c) for c in needs)]
    return (f"prompt_mode={mode} needs the capability {'+'.join(MODE_NEEDS[mode])}; this "
            f"backend lacks {'+'.join(missing)} and serves executor.prompt_mode="
            f"{'|'.join(served) or 'nothing'}")


def reduce_prompt(prompt: Prompt, parts: Sequence[str]) -> Prompt:
    """The prompt with only the given parts (`mode_parts`), canonical."""
    return Prompt(text=prompt.text if "text" in parts else None,
                  box=prompt.box if "box" in parts else None,
                  points=prompt.points if "points" in parts else (),
                  point_labels=prompt.point_labels if "points" in parts else ()).canonical()


def _fraction_in_box(mask: np.ndarray, box: Sequence[float]) -> float:
    area = int(mask.sum())
    if area == 0:
        return 0.0
    h, w = mask.shape
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    if x2 <= x1 or y2 <= y1:
        return 0.0
    return float(mask[y1:y2, x1:x2].sum()) / area


def choose_instances(result: Mapping[str, Any], prompt: Prompt, policy: str,
                     height: int, width: int, in_box_fraction: float = 0.5,
                     select_box: Sequence[float] | None = None) -> Segmentation:
    """One Segmentation from a server result (`{"instances": [...], "error": ...}`) to the
    `prompt` sent; `union_in_box` selects with `select_box` (default: the prompt's box)."""
    box_in = select_box if select_box is not None else prompt.box
    if result.get("error"):
        return Segmentation(rle=None, error=f"execute:prompt {result['error']}",
                            meta={"prompt": prompt.to_json()})
    inst = sorted(result.get("instances") or [], key=lambda i: -float(i.get("score") or 0.0))
    if not inst:
        return Segmentation(rle=masks.empty(height, width), score=0.0, box=None,
                            meta={"instances": 0})
    meta: dict[str, Any] = {"instances": len(inst)}
    chosen = inst[:1]
    if policy == "union":
        chosen = inst
    elif policy == "union_in_box" and box_in is not None and len(inst) > 1:
        decoded = [masks.decode(i["rle"]) for i in inst]
        inside = [i for i, m in zip(inst, decoded, strict=True)
                  if _fraction_in_box(m, box_in) >= in_box_fraction]
        chosen = inside or inst[:1]
        if not inside:
            meta["policy_fallback"] = "top1"
    if len(chosen) == 1:
        one = chosen[0]
        rle = {"size": [int(v) for v in one["rle"]["size"]], "counts": one["rle"]["counts"]}
        if tuple(rle["size"]) != (height, width):
            return Segmentation(rle=None, error=f"execute:bad_mask_size {rle['size']} != "
                                f"{[height, width]}", meta=meta)
        box = one.get("box")
        return Segmentation(rle=rle, score=float(one.get("score") or 0.0),
                            box=tuple(box) if box is not None else None, meta=meta)
    union = np.zeros((height, width), dtype=bool)
    for i in chosen:
        m = masks.decode(i["rle"])
        if m.shape != (height, width):
            return Segmentation(rle=None, error=f"execute:bad_mask_size {list(m.shape)} != "
                                f"{[height, width]}", meta=meta)
        union |= m
    meta["merged"] = len(chosen)
    return Segmentation(rle=masks.encode(union), score=max(float(i.get("score") or 0.0)
                                                           for i in chosen),
                        box=masks.bbox(union), meta=meta)


class RecordedInfo:
    """The /v1/info each SAM server answered, by URL, in one JSON file beside the cache: what
    lets an offline run name the backend of the cached masks with every server down."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, base_url: str) -> dict[str, Any] | None:
        """The info recorded for `base_url`; else, when every recorded server had one identity
        (a cluster's server moves between hosts, the backend stays), that one, whatever its
        URL; else None."""
        recorded = {url: info for url, info in self._read().items() if is_info(info)}
        if base_url in recorded:
            return dict(recorded[base_url])
        identities = {json.dumps(SamClient.server_identity(i), sort_keys=True, default=str): i
                      for i in recorded.values()}
        return dict(next(iter(identities.values()))) if len(identities) == 1 else None

    def put(self, base_url: str, info: Mapping[str, Any]) -> None:
        """Record `info` (atomically: a killed run leaves the previous file); a cache folder
        this run may not write is only logged."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the jobs of a sweep preflight at once: read-modify-write under a lock, so none
            # drops another's URL
            with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
                with contextlib.suppress(OSError):  # no flock here: last writer wins
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                data = {**self._read(), base_url: dict(info)}
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
                os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot record the executor's identity in %s: %s", self.path, exc)


class SamClient:
    """Executor over HTTP: the project's SAM server (any backend)."""

    simulated = False

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 120.0,
                 max_concurrency: int = 4, max_prompts_per_request: int = 64,
                 instance_policy: str = "union_in_box", in_box_fraction: float = 0.5,
                 prompt_mode: str = DEFAULT_PROMPT_MODE, max_instances: int = 16,
                 multimask: bool = False, info: Mapping[str, Any] | None = None,
                 retry: Mapping[str, Any] | RetryPolicy | None = None,
                 preflight_timeout_s: float = 10.0, info_file: str | Path | None = None):
        if not base_url:
            raise ValueError("executor: base_url is empty")
        if instance_policy not in INSTANCE_POLICIES:
            raise ValueError(f"executor.instance_policy must be one of {INSTANCE_POLICIES}, got "
                             f"{instance_policy!r}")
        parts = mode_parts(prompt_mode)
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout_s = float(timeout_s)
        self.max_prompts = int(max_prompts_per_request)
        self.instance_policy = instance_policy
        self.in_box_fraction = float(in_box_fraction)
        self.prompt_mode = prompt_mode
        self.prompt_parts = parts
        self.max_instances = int(max_instances)
        self.multimask = bool(multimask)
        self.pinned = dict(plain(info)) if info else None
        self.recorded = RecordedInfo(Path(info_file)) if info_file else None
        self.preflight_timeout_s = float(preflight_timeout_s)
        self.endpoint = Endpoint("executor", self.base_url, max_concurrency=max_concurrency,
                                 retry=retry)
        self._info: dict[str, Any] | None = None
        self._unresolved: str | None = None  # set once an identity without the server was given
        self._known: OrderedDict[str, None] = OrderedDict()
        self.http = HttpClient(self.base_url, timeout_s=self.timeout_s, headers=self._headers,
                               max_connections=max_concurrency)

    # -- identity -----------------------------------------------------------------------------
    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @staticmethod
    def server_identity(info: Mapping[str, Any]) -> dict[str, Any]:
        return {"protocol": info.get("protocol"), "backend": info.get("backend"),
                "model": info.get("model"), "identity": info.get("identity")}

    def _fetch_info_sync(self) -> dict[str, Any]:
        url = self.base_url + "/v1/info"
        info, problems = get_json_sync("executor", url, self.preflight_timeout_s, self._headers,
                                       retry=self.endpoint.retry, valid=is_info)
        if problems or not is_info(info):
            why = problems[0] if problems else f"not a SAM server's info: {str(info)[:200]}"
            raise EndpointError(self.base_url, (
                f"cannot read the executor's identity from {url} ({why}). Start the "
                "server, or pin `executor.info` to the identity recorded in a previous run's "
                "stats.json (models.executor.server) to work from the cache alone"))
        return dict(info)

    def identity(self) -> Mapping[str, Any]:
        """The server's backend identity and this client's mask policy; not the URL.

        The server's part is, first found: the pinned `info`; the /v1/info the preflight
        read; the one `info_file` recorded for this URL when a run last preflighted it (so an
        offline run needs no server); GET /v1/info now. When none is there (a config check,
        an offline run of a server never seen) the identity says so instead of raising,
        `identity_problem()` says why, and this client refuses to segment: masks must never be
        cached under a key that does not name their backend.
        """
        if self.pinned is not None:
            server = self.server_identity(self.pinned)
        else:
            if self._info is None and self.recorded is not None:
                self._info = self.recorded.get(self.base_url)
            if self._info is None and self._unresolved is None:  # one fetch, not one a call
                try:
                    self._info = self._fetch_info_sync()
                except EndpointError as exc:
                    self._unresolved = str(exc)
            server = (self.server_identity(self._info) if self._info is not None
                      else {"unresolved": True})
        return {"kind": "sam_server", "server": server, "instance_policy": self.instance_policy,
                "in_box_fraction": self.in_box_fraction if self.instance_policy ==
                "union_in_box" else None, "prompt_mode": self.prompt_mode,
                "max_instances": self.max_instances, "multimask": self.multimask}

    def identity_problem(self) -> str | None:
        """Why this client's identity is not known (see `identity`), or None."""
        self.identity()
        if self._unresolved is None:
            return None
        where = (f"; {self.recorded.path} records no identity for {self.base_url} (none, or "
                 "several servers')" if self.recorded is not None else "")
        return f"{self._unresolved}{where}"

    # -- transport ----------------------------------------------------------------------------
    async def _post(self, payload: dict[str, Any]) -> Response:
        return await self.http.post("/v1/segment", orjson.dumps(payload))

    def _error(self, resp: Response) -> EndpointError:
        detail = _detail(resp) or {}
        code = detail.get("code", "") if isinstance(detail, dict) else ""
        message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
        if code == "invalid_prompts" and isinstance(detail, dict):
            message += f" {detail.get('errors')}"
        status = resp.status_code
        after = resp.headers.get("retry-after")
        return EndpointError(self.base_url, f"POST /v1/segment: HTTP {status} {code}: "
                             f"{(message or resp.text)[:300]}", status=status,
                             retryable=status >= 500 or status == 429,
                             retry_after_s=float(after) if after and after.isdigit() else None)

    async def _segment_chunk(self, sample: Sample, prompts: Sequence[Prompt],
                             png: list[str]) -> tuple[list[dict[str, Any]], Cost]:
        """The server's results for `prompts`, and what the call cost: its prompts, an encode
        unless the server's embedding cache served the image, its own timing and the wall
        latency (resends included)."""
        digest = sample.image_sha256
        body: dict[str, Any] = {"prompts": [p.to_json() for p in prompts], "strict": False,
                                "multimask": self.multimask, "max_instances": self.max_instances}

        async def image_bytes() -> str:
            if not png:
                png.append(await asyncio.to_thread(png_b64, sample.image))
            return png[0]

        async def once() -> dict[str, Any]:
            if digest in self._known:
                resp = await self._post({**body, "image": {"sha256": digest}})
                if resp.status_code == 404 and _code(resp) == "image_not_found":
                    self._known.pop(digest, None)
                    self.endpoint.count("resends")
                    resp = await self._post({**body, "image": {"b64": await image_bytes()}})
            else:
                resp = await self._post({**body, "image": {"b64": await image_bytes()}})
            if resp.status_code != 200:
                raise self._error(resp)
            data = segment_answer(resp.content, len(prompts), self.base_url + "/v1/segment")
            if data.get("image_sha256") == digest:
                self._remember(digest)
            return data

        t0 = time.perf_counter()
        data = await self.endpoint.call(once, what=f"segment {len(prompts)} prompts")
        latency = time.perf_counter() - t0
        results = data["results"]
        timing = data.get("timing_ms") if isinstance(data.get("timing_ms"), Mapping) else {}
        try:
            server_s = max(0.0, float(timing.get("total") or 0.0) / 1e3)
        except (TypeError, ValueError):
            server_s = 0.0
        return results, Cost(prompts=len(prompts), calls=1, latency_s=latency,
                             encodes=0 if data.get("image_cached") else 1, server_s=server_s)

    def _remember(self, digest: str) -> None:
        self._known[digest] = None
        self._known.move_to_end(digest)
        while len(self._known) > KNOWN_IMAGES:
            self._known.popitem(last=False)

    # -- the Executor protocol ----------------------------------------------------------------
    async def segment(self, sample: Sample, prompts: Sequence[Prompt]) -> list[Segmentation]:
        """One Segmentation per prompt, in order; raises EndpointError on transport failure."""
        if self._unresolved is not None:
            raise EndpointError(self.base_url, "this client's identity() was taken while the "
                                f"server was unreachable ({self._unresolved}); cache keys would "
                                "not name the backend, so it will not segment")
        unsupported = mode_unsupported(self.prompt_mode, (self._info or {}).get("capabilities")
                                       ) if self._info else None
        if unsupported is not None:  # preflight says so first; this guards a run without it
            return [Segmentation(rle=None, error=f"execute:mode_unsupported {unsupported}")
                    for _ in prompts]
        reduced = [reduce_prompt(p, self.prompt_parts) for p in prompts]
        # a text UTF-8 cannot carry would fail the whole request: it fails its own prompt
        bad = {r.key: why for r in reduced if (why := text.unencodable(r.text or ""))}
        unique: dict[str, Prompt] = {}
        for r in reduced:
            if not r.empty and r.key not in bad:
                unique.setdefault(r.key, r)
        todo = list(unique.values())
        limit = self.max_prompts
        if self._info and self._info.get("max_prompts"):
            limit = min(limit, int(self._info["max_prompts"]))
        chunks = [todo[k:k + limit] for k in range(0, len(todo), limit)]
        png: list[str] = []
        answers: dict[str, dict[str, Any]] = {}
        costs: dict[str, Cost] = {}  # a call's cost on its first prompt, a prompt each
        if chunks:  # the first request carries the image; the rest refer to it by digest
            first = await self._segment_chunk(sample, chunks[0], png)
            rest = await asyncio.gather(*(self._segment_chunk(sample, c, png)
                                          for c in chunks[1:]))
            for chunk, (res, spent) in zip(chunks, [first, *rest], strict=True):
                answers.update(zip((p.key for p in chunk), res, strict=True))
                for k, p in enumerate(chunk):
                    costs[p.key] = dataclasses.replace(spent, prompts=1) if k == 0 else \
                        Cost(prompts=1)
        out: list[Segmentation] = []
        for p, r in zip(prompts, reduced, strict=True):
            if r.empty:
                out.append(Segmentation(rle=None, error=(
                    f"execute:empty_prompt nothing left of the prompt with prompt_mode="
                    f"{self.prompt_mode} (it sends {'+'.join(self.prompt_parts)})")))
            elif r.key in bad:  # permanent: the same text fails the same way on every rerun
                out.append(Segmentation(rle=None, error=f"execute:bad_text {bad[r.key]}"))
            else:  # instances chosen with the hypothesis's box, sent or not
                seg = choose_instances(answers[r.key], r, self.instance_policy,
                                       sample.height, sample.width, self.in_box_fraction,
                                       select_box=p.canonical().box)
                spent = costs.pop(r.key, None)  # two prompts reduced alike: one paid
                out.append(seg if spent is None else
                           Segmentation(rle=seg.rle, score=seg.score, box=seg.box,
                                        error=seg.error, meta=with_cost(seg.meta, spent)))
        return out

    async def preflight(self, sample: Sample | None = None) -> list[str]:
        """Server up and ready; its identity matches a pinned `info`; it serves the mode. No
        probe request is needed (`sample` is unused): /v1/info says what the server serves."""
        health, problems = await get_json("executor", self.base_url + "/health",
                                          self.preflight_timeout_s, retry=self.endpoint.retry,
                                          valid=is_health)
        if problems:
            return problems
        if not (isinstance(health, dict) and health.get("ready")):
            return [f"SAM server {self.base_url} is not ready: {health}"]
        info, problems = await get_json("executor", self.base_url + "/v1/info",
                                        self.preflight_timeout_s, self._headers,
                                        retry=self.endpoint.retry, valid=is_info)
        if problems:
            return problems
        if not is_info(info):
            return [f"{self.base_url}/v1/info is not a SAM server's info: {str(info)[:200]}"]
        self._info = dict(info)
        if self.recorded is not None:
            self.recorded.put(self.base_url, self._info)
        if self.pinned is not None and (self.server_identity(self.pinned) !=
                                        self.server_identity(self._info)):
            return [f"SAM server {self.base_url} has identity "
                    f"{self.server_identity(self._info)}, but executor.info pins "
                    f"{self.server_identity(self.pinned)}"]
        unsupported = mode_unsupported(self.prompt_mode, self._info.get("capabilities"))
        if unsupported is not None:
            return [f"SAM server {self.base_url} ({self._info.get('backend')}): {unsupported}"]
        return []

    async def aclose(self) -> None:
        await self.http.aclose()

    def stats(self) -> dict[str, Any]:
        return {"role": "executor", **self.endpoint.stats()}


def _detail(resp: Response) -> Any:
    """The `detail` of an error body (servers/README.md), None when the body has none."""
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return None
    return body.get("detail") if isinstance(body, dict) else None


def _code(resp: Response) -> str:
    detail = _detail(resp)
    return str(detail.get("code", "")) if isinstance(detail, dict) else ""


def _instance_ok(inst: Any) -> bool:
    rle = inst.get("rle") if isinstance(inst, dict) else None
    return (isinstance(rle, dict) and isinstance(rle.get("size"), list)
            and len(rle["size"]) == 2 and isinstance(rle.get("counts"), str | list))


def segment_answer(body: bytes, prompts: int, where: str) -> dict[str, Any]:
    """A 200 of POST /v1/segment as the protocol says (servers/README.md): an object whose
    `results` hold one `{"instances": [...], "error": ...}` per prompt sent, every instance
    with an RLE. Anything else (not JSON, cut short, another shape) is `UndecodableReply`,
    retried like a dropped connection; what a well-formed result says is the model's answer."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UndecodableReply(where, f"a 200 whose body is not JSON ({exc}): "
                               f"{bytes(body[:120])!r}") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or len(results) != prompts:
        raise UndecodableReply(where, f"a 200 without {prompts} results: {str(data)[:120]!r}")
    for k, r in enumerate(results):
        instances = r.get("instances") if isinstance(r, dict) else None
        if not (isinstance(r, dict) and isinstance(instances, list | None)
                and isinstance(r.get("error"), str | None)
                and all(_instance_ok(i) for i in instances or ())):
            raise UndecodableReply(where, f"result {k} is not a segmentation: {str(r)[:120]!r}")
    return data
