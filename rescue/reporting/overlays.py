"""Contact sheets: one sample, its ground truth and its best candidates, readable at a glance.

A sheet answers "what did the method see and pick?": the query on top, the image, the ground
truth, then the distinct candidate masks ranked by verifier score, each captioned with its
index, verifier score and true IoU, the selected one framed. Drawn with OpenCV and PIL only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rescue import colors
from rescue.models.views import region_colors
from rescue.records import CandidateRecord, SampleRecord
from rescue.sample import IGNORE, Sample

log = logging.getLogger(__name__)

TILE = 300  # longest side of one tile's picture, pixels
CAPTION_H = 50
MIN_CELL_W = 250  # room for a caption beside tall images
PAD = 10
COLUMNS = 5
BG = (246, 246, 246)
INK = (25, 25, 25)
MUTED = (110, 110, 110)
GT_RGB = (0, 200, 80)
PRED_RGB = (0, 225, 255)  # each sheet's own where its masks' pixels are too alike (`sheet_colors`)
BOX_RGB = (255, 215, 0)
SELECTED_RGB = (255, 170, 0)
SELECTED_BG = (255, 238, 200)
SIMULATED_RGB = (190, 0, 30)


Caption = list[tuple[str, tuple[int, int, int]]]  # one line: (text, colour) segments


@dataclass(frozen=True)
class OverlayItem:
    """What one sheet needs: the sample, its record, decoded candidate masks, the chosen index."""

    sample: Sample
    record: SampleRecord
    masks: Mapping[int, np.ndarray]
    selected: int | None = None


@dataclass(frozen=True)
class Shown:
    """A distinct candidate mask on the sheet; `copies` counts the indices that produced it."""

    candidate: CandidateRecord
    copies: int
    selected: bool


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _score_key(c: CandidateRecord) -> tuple[float, float, int]:
    v = c.verifier_score if c.verifier_score is not None else float("-inf")
    e = c.executor_score if c.executor_score is not None else float("-inf")
    return (-v, -e, c.index)


def shown_candidates(record: SampleRecord, selected: int | None,
                     max_candidates: int = 8) -> list[Shown]:
    """Distinct working masks, best verifier score first; the selected one always included."""
    by_index = {c.index: c for c in record.candidates}
    copies: dict[int, int] = {}
    for c in record.candidates:
        if c.ok:
            root = c.duplicate_of if c.duplicate_of is not None else c.index
            copies[root] = copies.get(root, 0) + 1
    roots = [by_index[i] for i in copies if i in by_index and by_index[i].ok]
    roots.sort(key=_score_key)
    chosen_root = None
    if selected is not None and selected in by_index:
        sel = by_index[selected]
        chosen_root = sel.duplicate_of if sel.duplicate_of is not None else sel.index
    top = roots[:max(0, max_candidates)]
    missing = chosen_root is not None and all(c.index != chosen_root for c in top)
    if missing and chosen_root in copies:
        top = [*top[:max(0, max_candidates - 1)], by_index[chosen_root]]
    return [Shown(c, copies[c.index], c.index == chosen_root) for c in top]


def _scaled(image: np.ndarray, tile: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    s = tile / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR), s


def _scale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask).astype(np.uint8)
    return cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _tint(base: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int],
          alpha: float = 0.45) -> np.ndarray:
    out = base.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(rgb, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _contour(img: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, rgb, thickness, lineType=cv2.LINE_AA)


def _spotlight(small: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Darken everything outside the mask, tint it lightly, outline it: it pops on any image."""
    img = small.astype(np.float32)
    img[~mask] *= 0.4
    img = _tint(img.astype(np.uint8), mask, rgb, 0.3)
    _contour(img, mask, rgb, 2)
    return img


def sheet_colors(small: np.ndarray, gt_small: np.ndarray, shown: Iterable[np.ndarray]
                 ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The ground truth's and the candidates' colours on one sheet: the usual green and cyan,
    unless the pixels under the target (resp. the shown masks) are too close to them, then the
    palette colour farthest from those pixels and the sheet's other colours."""
    union = np.zeros(small.shape[:2], bool)
    for m in shown:
        union |= m
    gt = colors.stands_out(GT_RGB, [*region_colors(small, gt_small)[:1], BOX_RGB])
    pred = colors.stands_out(PRED_RGB, [*region_colors(small, union)[:1], gt, BOX_RGB])
    return gt, pred


def _gt_tile(small: np.ndarray, gt: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    target = _scale_mask(gt == 1, small.shape[:2])
    ignore = _scale_mask(gt == IGNORE, small.shape[:2])
    img = _spotlight(small, target, rgb)
    return _tint(img, ignore, (150, 150, 150), 0.7)


def _candidate_tile(small: np.ndarray, gt_small: np.ndarray, mask: np.ndarray | None,
                    c: CandidateRecord, scale: float,
                    palette: tuple[tuple[int, int, int], tuple[int, int, int]]) -> np.ndarray:
    m = (_scale_mask(mask, small.shape[:2]) if mask is not None
         else np.zeros(small.shape[:2], bool))
    gt_rgb, pred_rgb = palette
    img = _spotlight(small, m, pred_rgb)
    _contour(img, gt_small, gt_rgb, 1)  # the truth's outline, for reference
    if c.box is not None and len(c.box) == 4 and all(np.isfinite(c.box)):
        x1, y1, x2, y2 = (round(v * scale) for v in c.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), BOX_RGB, 1, lineType=cv2.LINE_AA)
    labels = getattr(c, "point_labels", None) or []
    for k, p in enumerate(c.points or []):
        positive = k >= len(labels) or labels[k] == 1
        if len(p) == 2 and all(np.isfinite(p)):
            xy = (round(p[0] * scale), round(p[1] * scale))
            cv2.circle(img, xy, 5, (0, 0, 0), -1, lineType=cv2.LINE_AA)
            cv2.circle(img, xy, 4, BOX_RGB if positive else (255, 60, 60), -1,
                       lineType=cv2.LINE_AA)
    return img


def _iou_color(iou: float) -> tuple[int, int, int]:
    if iou >= 0.75:
        return (0, 140, 60)
    if iou >= 0.4:
        return (200, 120, 0)
    return (200, 20, 20)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def draw_candidates(sample: Sample, record: SampleRecord, masks: Mapping[int, np.ndarray],
                    selected: int | None, max_candidates: int = 8) -> np.ndarray:
    """The sample's contact sheet as an (H, W, 3) uint8 RGB array."""
    small, scale = _scaled(sample.image, TILE)
    th, tw = small.shape[:2]
    gt_small = _scale_mask(sample.gt == 1, (th, tw))
    shown = shown_candidates(record, selected, max_candidates)
    drawable = {}
    for s in shown:
        mask = masks.get(s.candidate.index)
        if mask is not None and np.shape(mask) != sample.gt.shape:
            log.warning("%s #%d: mask shape %s != image %s; not drawn", record.sample_id,
                        s.candidate.index, np.shape(mask), sample.gt.shape)
            continue
        drawable[s.candidate.index] = mask
    palette = sheet_colors(small, gt_small, [_scale_mask(m, (th, tw))
                                             for m in drawable.values() if m is not None])
    gt_rgb, pred_rgb = palette
    tiles: list[tuple[np.ndarray, list[Caption], bool]] = [
        (small, [[("image", INK)], [(f"{sample.width} x {sample.height} px", MUTED)]], False),
        (_gt_tile(small, sample.gt, gt_rgb), [[("ground truth", gt_rgb)], [
            (f"target area {record.target_area} px", MUTED)]], False),
    ]
    for s in shown:
        c = s.candidate
        mask = drawable.get(c.index)
        bad_shape = c.index not in drawable
        line1 = [(f"#{c.index}  verifier {_fmt(c.verifier_score)}", INK),
                 (f"   exec {_fmt(c.executor_score)}", MUTED)]
        line2 = [(f"IoU {c.iou:.2f}", _iou_color(c.iou))]
        if s.copies > 1:
            line2.append((f"   same mask x{s.copies}", MUTED))
        if mask is None:
            line2.append(("   bad mask shape" if bad_shape else "   mask not loaded",
                          SIMULATED_RGB))
        elif c.area == 0:
            line2.append(("   empty mask", MUTED))
        tiles.append((_candidate_tile(small, gt_small, mask, c, scale, palette),
                      [line1, line2], s.selected))

    cols = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // cols)
    inner_w = max(tw, MIN_CELL_W)
    cell_w, cell_h = inner_w + PAD, th + CAPTION_H + PAD
    width = cols * cell_w + PAD
    title_font, body_font, small_font = _font(20), _font(15), _font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sim_label = "SIMULATED models" if record.simulated else ""
    sim_w = measure.textlength(sim_label, font=body_font) + 2 * PAD if sim_label else 0
    query_lines = _wrap(measure, f"“{record.query or sample.query}”", title_font,
                        width - 2 * PAD - sim_w)
    if len(query_lines) > 3:
        query_lines = [*query_lines[:2], query_lines[2] + " …"]
    working = [c for c in record.candidates if c.ok]
    distinct = {c.duplicate_of if c.duplicate_of is not None else c.index for c in working}
    meta = (f"{record.sample_id} · {record.dataset or sample.dataset} · "
            f"{len(record.candidates)} candidates, {len(record.candidates) - len(working)} "
            f"failed, {len(distinct)} distinct masks · showing top {len(shown)} by verifier score")
    if selected is not None:
        meta += f" · selected #{selected}"
    meta_lines = [(line, MUTED) for line in _wrap(measure, meta, small_font, width - 2 * PAD)]
    if record.error:
        meta_lines += [(line, SIMULATED_RGB) for line in _wrap(
            measure, f"sample failed: {record.error[:300]}", small_font, width - 2 * PAD)[:2]]
    header_h = PAD + 26 * len(query_lines) + 17 * (len(meta_lines) + 1) + PAD
    canvas = Image.new("RGB", (width, header_h + rows * cell_h + PAD), BG)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for line in query_lines:
        draw.text((PAD, y), line, fill=INK, font=title_font)
        y += 26
    if sim_label:
        draw.text((width - sim_w + PAD, PAD + 3), sim_label, fill=SIMULATED_RGB, font=body_font)
    for line, color in meta_lines:
        draw.text((PAD, y), line, fill=color, font=small_font)
        y += 17
    lx = PAD
    for text, color in (("candidate mask", pred_rgb), ("ground truth (outline on candidates)",
                                                       gt_rgb), ("prompt box, points", BOX_RGB)):
        draw.rectangle((lx, y + 2, lx + 12, y + 14), fill=color, outline=INK)
        draw.text((lx + 17, y), text, fill=INK, font=small_font)
        lx += draw.textlength(text, font=small_font) + 34
    for k, (img, caption, is_selected) in enumerate(tiles):
        x0 = PAD + (k % cols) * cell_w
        y0 = header_h + (k // cols) * cell_h
        if is_selected:
            draw.rectangle((x0 - 5, y0 - 5, x0 + inner_w + 4, y0 + th + CAPTION_H - 1),
                           fill=SELECTED_BG, outline=SELECTED_RGB, width=5)
        canvas.paste(Image.fromarray(img), (x0 + (inner_w - tw) // 2, y0))
        cy = y0 + th + 4
        for line in caption:
            cx = x0 + 2
            for text, color in line:
                draw.text((cx, cy), text, fill=color, font=body_font)
                cx += draw.textlength(text, font=body_font)
            cy += 19
        if is_selected:
            badge = "SELECTED"
            bw = draw.textlength(badge, font=small_font)
            draw.rectangle((x0, y0, x0 + bw + 10, y0 + 19), fill=SELECTED_RGB)
            draw.text((x0 + 5, y0 + 2), badge, fill=INK, font=small_font)
    return np.asarray(canvas)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
          max_width: float) -> list[str]:
    """Greedy word wrap by rendered width."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "sample"


def write_overlays(items: Iterable[OverlayItem], out_dir: Path | str,
                   max_candidates: int = 8) -> list[Path]:
    """One PNG per item; a sheet that cannot be drawn is logged and skipped, never fatal. No
    item (`report.overlays=0`, `mode=evaluate`): no folder either."""
    out = Path(out_dir)
    items = list(items)
    if items:
        out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k, item in enumerate(items):
        path = out / f"{k:02d}_{_slug(item.record.sample_id)}.png"
        try:
            sheet = draw_candidates(item.sample, item.record, item.masks, item.selected,
                                    max_candidates)
            Image.fromarray(sheet).save(path, optimize=True)
        except Exception as exc:  # one bad sample must not lose the report
            log.warning("overlay for %s failed: %s: %s", item.record.sample_id,
                        type(exc).__name__, exc)
            continue
        paths.append(path)
    return paths


def mask_layers(item: OverlayItem, max_candidates: int = 3,
                longest_side: int = 512) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A downscaled image and uint8 class masks (ground truth, selected, top candidates).

    Ground truth: 1 target, 2 ignore. Each candidate layer: 1 where the mask is. For viewers
    that toggle mask layers (W&B's `masks=`).
    """
    small, _ = _scaled(item.sample.image, longest_side)
    shape = small.shape[:2]
    gt = np.zeros(shape, np.uint8)
    gt[_scale_mask(item.sample.gt == IGNORE, shape)] = 2
    gt[_scale_mask(item.sample.gt == 1, shape)] = 1
    layers = {"ground_truth": gt}
    for s in shown_candidates(item.record, item.selected, max_candidates):
        mask = item.masks.get(s.candidate.index)
        if mask is None:
            continue
        name = "selected" if s.selected else f"candidate_{s.candidate.index}"
        layers[name] = _scale_mask(mask, shape).astype(np.uint8)
    return small, layers
