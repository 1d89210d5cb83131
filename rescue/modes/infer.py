"""Single-image inference (the seed's `run_inference.py`): one image, one query, one mask.

    python run.py experiment=http_synthetic mode=infer image=example.jpg \
        query="the red car in the background" max_n=16

`experiment=` picks the real models (Qwen3-VL planner and verifier, SAM3 server; any experiment
with real models works, e.g. refcoco_multi_n; group overrides such as `verifier=...` go after
it). It runs the same pipeline as a benchmark (plan max_n hypotheses, execute each distinct
prompt, verify each distinct mask, through the shared cache) and writes into the run directory:
    mask.png         the selected mask (0/255), same size as the image
    overlay.png      the image with the selected mask drawn on it, tinted in the palette colour
                     farthest from the pixels under and around it, its outline edged in black
                     or white (`views.draw_contrasting`: red is not drawn on a red car)
    candidates.json  every candidate ranked by the selector, with its prompt and all its scores
    candidates.png   the best distinct candidate masks side by side, captioned
Simulated models read a ground truth that a lone image does not have, so they are refused.
The run uses the shared cache (`paths.cache_dir`, `offline=true` as in a benchmark), and the
image is refused from its header when over `image_max_pixels` or `image_max_side`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from rescue import images, listwise, selection
from rescue.cache import Cache
from rescue.images import DEFAULT_LIMITS, ImageLimits
from rescue.models.roles import Models, check_endpoints
from rescue.models.views import OverlayStyle, draw_contrasting
from rescue.pipeline import Pipeline
from rescue.protocols import Executor, Planner, Verifier
from rescue.records import SampleRecord
from rescue.sample import Sample
from rescue.selection import Selector
from rescue.settings import EvaluationSettings

log = logging.getLogger("rescue.modes.infer")

MAX_TILES = 8
TILE = 256


class _OneImage:
    """A one-sample Dataset, so inference runs through the benchmark's own pipeline."""

    name = "infer"

    def __init__(self, sample: Sample):
        self.sample = sample

    def sample_ids(self) -> list[str]:
        return [self.sample.sample_id]

    def load(self, sample_id: str) -> Sample:
        return self.sample


@dataclass
class InferenceResult:
    sample: Sample
    record: SampleRecord
    selector: str
    selected: int | None  # hypothesis index of the answer; None when every candidate failed
    mask: np.ndarray  # (H, W) bool; all False when nothing was selected
    ranked: list[dict[str, Any]]
    paths: dict[str, Path]
    calls: dict[str, Any]


def _ranked(record: SampleRecord, selector: Selector, seed: int) -> list[dict[str, Any]]:
    cands = record.candidates
    s = selector.scores(cands, key=record.sample_id, seed=seed)
    order = sorted(range(len(cands)), key=lambda k: (-s[k] if np.isfinite(s[k]) else np.inf,
                                                     cands[k].index))
    out = []
    for rank, k in enumerate(order):
        c = cands[k]
        out.append({"rank": rank, "index": c.index,
                    "score": float(s[k]) if np.isfinite(s[k]) and s[k] > selection.UNSCORED
                    else None,
                    "verifier_score": c.verifier_score, "verifier_source": c.verifier_source,
                    "executor_score": c.executor_score, "consensus": c.consensus,
                    "text": c.text, "box": c.box, "points": c.points, "area": c.area,
                    "duplicate_of": c.duplicate_of, "failed_stage": c.failed_stage,
                    "error": c.error})
    return out


def _sheet(image: np.ndarray, ranked: Sequence[dict[str, Any]], masks: dict[int, np.ndarray],
           style: OverlayStyle) -> np.ndarray:
    """The best distinct candidates drawn side by side, captioned with index and scores; each
    tile's colour chosen from its own mask's surroundings (`views.draw_contrasting`)."""
    tiles = []
    for row in ranked:
        if len(tiles) >= MAX_TILES:
            break
        if row["failed_stage"] in ("plan", "execute") or row["duplicate_of"] is not None:
            continue
        m = masks.get(row["index"])
        if m is None:
            continue
        tile = draw_contrasting(image, m, style)
        scale = TILE / max(tile.shape[:2])
        tile = cv2.resize(tile, (max(1, round(tile.shape[1] * scale)),
                                 max(1, round(tile.shape[0] * scale))))
        canvas = np.full((TILE + 24, TILE, 3), 255, np.uint8)
        canvas[: tile.shape[0], : tile.shape[1]] = tile
        v = row["verifier_score"]
        caption = f"#{row['rank'] + 1} h{row['index']} v={v:.2f}" if v is not None else \
            f"#{row['rank'] + 1} h{row['index']} v=n/a"
        cv2.putText(canvas, caption, (4, TILE + 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (20, 20, 20),
                    1, cv2.LINE_AA)
        tiles.append(canvas)
    if not tiles:
        return np.full((TILE + 24, TILE, 3), 255, np.uint8)
    return np.concatenate(tiles, axis=1)


async def infer(image_path: str | Path, query: str, planner: Planner, executor: Executor,
                verifier: Verifier, max_n: int, out_dir: str | Path, *,
                cache: Cache | None = None, selector: Selector = selection.VERIFIER,
                seed: int = 0, check: bool = True,
                limits: ImageLimits = DEFAULT_LIMITS) -> InferenceResult:
    """Segment what `query` refers to in the image at `image_path`; write the outputs.

    The image is read first (`rescue.images`: EXIF orientation applied, so the mask matches
    what one sees; one larger than `limits` is refused from its header, before decoding).
    `cache` is the shared cache, offline or not; None: a private one in `out_dir`. `check`
    runs each model's preflight first (clear errors before any work). The models are not
    closed here (the caller owns them).
    """
    if not query or not str(query).strip():
        raise ValueError("inference needs a non-empty query")
    simulated = [n for n, m in (("planner", planner), ("executor", executor),
                                ("verifier", verifier)) if m.simulated]
    if simulated:
        raise ValueError(f"mode=infer needs real models, but {', '.join(simulated)} "
                         "is simulated (it reads a ground truth a lone image does not have); "
                         "run with experiment=http_synthetic (or another experiment with real "
                         "models)")
    if selector.needs_truth:
        usable = [s.name for s in selection.SELECTORS.values() if not s.needs_truth]
        raise ValueError(f"the {selector.name} selector needs the ground truth; use one of "
                         f"{', '.join(usable)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image = images.read(image_path, limits)
    sample = Sample(sample_id=Path(image_path).stem or "image", query=str(query).strip(),
                    image=image, gt=np.zeros(image.shape[:2], np.uint8), dataset="infer")
    if check:
        await check_endpoints(Models(planner=planner, executor=executor, verifier=verifier))
    # `is None`, not falsiness: an empty shared cache (len 0) is still the one to use
    cache = Cache(out / "cache") if cache is None else cache
    # a listwise verifier is asked only the whole pool's set: the single answer's
    pipe = Pipeline(planner, executor, verifier, cache, max_n=max_n,
                    samples_in_flight=1, progress=False,
                    plan=listwise.Plan((max_n,), seed=seed, draws=2))
    (record,) = await pipe.run(_OneImage(sample), [sample.sample_id])
    masks = pipe.masks.of(record)
    selected = selector.answer(record, seed)
    mask = masks.get(selected, np.zeros(image.shape[:2], bool)) if selected is not None else \
        np.zeros(image.shape[:2], bool)
    ranked = _ranked(record, selector, seed)
    style = OverlayStyle()
    paths = {"mask": out / "mask.png", "overlay": out / "overlay.png",
             "candidates": out / "candidates.json", "sheet": out / "candidates.png"}
    Image.fromarray(mask.astype(np.uint8) * 255).save(paths["mask"])
    Image.fromarray(draw_contrasting(image, mask, style)).save(paths["overlay"])
    Image.fromarray(_sheet(image, ranked, masks, style)).save(paths["sheet"])
    calls = pipe.stats.to_json()
    paths["candidates"].write_text(json.dumps({
        "image": str(image_path), "query": sample.query, "width": sample.width,
        "height": sample.height, "max_n": max_n, "selector": selector.name, "selected": selected,
        "models": pipe.identities, "calls": calls,
        "candidates": ranked}, indent=2, default=str))
    return InferenceResult(sample=sample, record=record, selector=selector.name, selected=selected,
                           mask=mask, ranked=ranked, paths=paths, calls=calls)


def main(cfg: DictConfig) -> float | None:
    """`mode=infer`: build the configured models, run `infer`, print the ranking.

    Returns the selected candidate's verifier score (None when nothing was selected)."""
    from hydra.utils import to_absolute_path

    if not cfg.get("image") or not cfg.get("query"):
        raise ValueError('mode=infer needs image=<path> and query="<text>"')
    image = Path(to_absolute_path(str(cfg.image)))
    settings = EvaluationSettings.from_config(cfg, bounded=False)  # the primary and the seed
    cache = Cache(cfg.paths.cache_dir, offline=bool(cfg.offline))
    limits = ImageLimits(int(cfg.image_max_pixels), int(cfg.image_max_side))

    async def go() -> InferenceResult:
        # `infer` preflights, after checking the query and the models' kind
        async with Models.from_config(cfg).ready(check=False,
                                                 offline=bool(cfg.offline)) as models:
            return await infer(image, str(cfg.query), models.planner, models.executor,
                               models.verifier, int(cfg.max_n), cfg.paths.output_dir,
                               cache=cache, selector=settings.primary, seed=settings.seed,
                               check=not bool(cfg.offline), limits=limits)

    result = asyncio.run(go())
    log.info("query %r on %s: selected hypothesis %s; outputs in %s", result.sample.query,
             image.name, result.selected, Path(cfg.paths.output_dir))
    for row in result.ranked[:5]:
        log.info("  #%d h%d score=%s text=%r box=%s %s", row["rank"] + 1, row["index"],
                 row["score"], row["text"], row["box"], row["error"] or "")
    top = next((r for r in result.ranked if r["index"] == result.selected), None)
    return top["verifier_score"] if top is not None else None
