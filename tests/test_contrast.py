"""Overlays for people stand out from the image (issue 11): inference's mask is never drawn in
red on a red object, and a contact sheet changes its usual colours where the masks' pixels
share them. What a verifier sees keeps its configured colour (`draw_overlay` without a halo)."""

from __future__ import annotations

import numpy as np
import pytest
from reporting_fakes import make_sample

from rescue import colors
from rescue.models.views import OverlayStyle, contrasting_style, draw_contrasting, draw_overlay
from rescue.reporting.overlays import BOX_RGB, GT_RGB, PRED_RGB, sheet_colors

RED = (220, 30, 30)


def _delta(a, b) -> float:
    return float(np.linalg.norm(colors.lab(a) - colors.lab(b)))


def _scene(obj, background, shape=(90, 140)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = (yy - 45) ** 2 + (xx - 70) ** 2 < 25 ** 2
    image = np.full((*shape, 3), background, np.uint8)
    image[mask] = obj
    return image, mask


def test_a_red_object_is_not_tinted_red():
    image, mask = _scene(RED, (128, 128, 128))
    style, halo = contrasting_style(image, mask)
    assert _delta(style.color, RED) > 60 and _delta(style.color, (128, 128, 128)) > 40
    out = draw_contrasting(image, mask).astype(int)
    # the tinted inside moved away from the object's red; the outline's halo is drawn
    inner = mask.copy()
    inner[:, :50] = inner[:, 90:] = False
    stock = draw_overlay(image, mask, OverlayStyle()).astype(int)  # red: it vanishes
    assert _delta(stock[inner].mean(axis=0), RED) < 15
    assert _delta(out[inner].mean(axis=0), RED) > 25
    assert (np.abs(out - np.array(halo)).sum(axis=-1) == 0).sum() > 100
    plain = draw_overlay(image, mask, style).astype(int)
    assert not (np.abs(plain - np.array(halo)).sum(axis=-1) == 0).any()


@pytest.mark.parametrize(("background", "halo"), [((250, 250, 250), (0, 0, 0)),
                                                  ((15, 15, 30), (255, 255, 255))])
def test_the_halo_contrasts_with_the_surroundings(background, halo):
    image, mask = _scene((60, 160, 60), background)
    assert contrasting_style(image, mask)[1] == halo


def test_the_choice_is_deterministic_and_survives_an_empty_mask():
    image, mask = _scene(RED, (128, 128, 128))
    assert contrasting_style(image, mask) == contrasting_style(image.copy(), mask.copy())
    empty = np.zeros_like(mask)
    np.testing.assert_array_equal(draw_contrasting(image, empty), image)


def test_a_sheet_keeps_its_colours_unless_the_masks_share_them():
    s = make_sample()  # a red target: the usual green and cyan stand out
    target = s.gt == 1
    assert sheet_colors(s.image, target, [target]) == (GT_RGB, PRED_RGB)
    green = s.image.copy()
    green[target] = GT_RGB
    gt, pred = sheet_colors(green, target, [target])
    assert gt != GT_RGB and _delta(gt, GT_RGB) > 35 and _delta(gt, BOX_RGB) > 35
    cyan = s.image.copy()
    cyan[target] = (10, 215, 245)
    gt, pred = sheet_colors(cyan, target, [target])
    assert gt == GT_RGB and pred != PRED_RGB and _delta(pred, (10, 215, 245)) > 35
    assert _delta(pred, gt) > 35
