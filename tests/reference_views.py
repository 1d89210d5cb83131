"""Test-only reference of a verifier's views as they were drawn and encoded before they were
made cheaper: the whole image converted to float32 and tinted through a mask,
the crop's box from `np.nonzero`, every JPEG through `convert("RGB")`. The views' bytes feed
the verifier's cache keys, so the shipped code must give these bytes exactly
(tests/test_views.py); benchmarks/bench_views.py times both.
"""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
from PIL import Image

from rescue.colors import RGB
from rescue.models.chat import ImageEncoding
from rescue.models.views import OverlayStyle, _outline


def draw_overlay(image: np.ndarray, mask: np.ndarray, style: OverlayStyle, *,
                 halo: RGB | None = None) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.shape != image.shape[:2]:
        raise ValueError(f"mask shape {m.shape} != image shape {image.shape[:2]}")
    out = image.astype(np.float32)
    color = np.array(style.color, dtype=np.float32)
    out[m] = (1.0 - style.alpha) * out[m] + style.alpha * color
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        width = _outline(m.shape, style)
        if halo is not None:
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in halo), 2 * width + 2)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in style.color), width)
    return out


def crop_box(mask: np.ndarray, style: OverlayStyle) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    x1, x2, y1, y2 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    side = max(x2 - x1, y2 - y1)
    pad = style.crop_context * side
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half_w = max((x2 - x1) / 2.0 + pad, style.crop_min_px / 2.0)
    half_h = max((y2 - y1) / 2.0 + pad, style.crop_min_px / 2.0)
    bx1, bx2 = max(0, int(np.floor(cx - half_w))), min(w, int(np.ceil(cx + half_w)))
    by1, by2 = max(0, int(np.floor(cy - half_h))), min(h, int(np.ceil(cy + half_h)))
    return bx1, by1, bx2, by2


def render_views(image: np.ndarray, mask: np.ndarray,
                 style: OverlayStyle) -> list[tuple[str, np.ndarray]]:
    overlay = draw_overlay(image, mask, style)
    views: list[tuple[str, np.ndarray]] = []
    for name in style.views:
        if name == "overlay":
            views.append((name, overlay))
        elif name == "image":
            views.append((name, np.ascontiguousarray(image)))
        else:
            box = crop_box(np.asarray(mask, dtype=bool), style)
            if box is None:
                views.append((name, overlay))
                continue
            x1, y1, x2, y2 = box
            crop = overlay[y1:y2, x1:x2]
            scale = style.crop_size / max(crop.shape[:2])
            size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
            interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            views.append((name, cv2.resize(crop, size, interpolation=interp)))
    return views


def data_url(enc: ImageEncoding, image: np.ndarray) -> str:
    pil = Image.fromarray(np.ascontiguousarray(image))
    w, h = enc.sent_size(pil.width, pil.height)
    if (w, h) != (pil.width, pil.height):
        pil = pil.resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if enc.format == "png":
        pil.save(buf, format="PNG")
        mime = "image/png"
    else:
        pil.convert("RGB").save(buf, format="JPEG", quality=int(enc.quality))
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def view_urls(image: np.ndarray, mask: np.ndarray, style: OverlayStyle,
              enc: ImageEncoding) -> tuple[str, ...]:
    """`OpenAIVerifier.view_urls` as it was."""
    return tuple(data_url(enc, img) for _, img in render_views(image, mask, style))
