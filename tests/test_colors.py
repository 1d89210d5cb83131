"""CIELAB distances pick colours people can tell apart (rescue/colors.py)."""

import numpy as np
import pytest

from rescue import colors


def test_lab_of_reference_colours():
    np.testing.assert_allclose(colors.lab((255, 255, 255)), [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(colors.lab((0, 0, 0)), [0, 0, 0], atol=0.01)
    red = colors.lab((255, 0, 0))  # the published sRGB red: L 53.24, a 80.09, b 67.20
    np.testing.assert_allclose(red, [53.24, 80.09, 67.20], atol=0.05)
    assert colors.lab(np.zeros((4, 5, 3))).shape == (4, 5, 3)


def test_farthest_and_hex():
    assert colors.hex_rgb("#1f77b4") == (31, 119, 180)
    assert colors.rgb_hex((31, 119, 180)) == "#1f77b4"
    with pytest.raises(ValueError, match="rrggbb"):
        colors.hex_rgb("blue")
    # away from red, green beats orange; nothing to avoid: the first
    assert colors.farthest([(255, 128, 0), (0, 200, 0)], [(255, 0, 0)]) == 1
    assert colors.farthest([(1, 2, 3), (4, 5, 6)], []) == 0


def test_distinct_never_repeats_a_taken_colour_and_stays_readable_on_white():
    taken = [(31, 119, 180), (0, 0, 0)]
    picked = colors.distinct(8, taken)
    assert len(set(picked)) == 8 and not set(picked) & set(taken)
    assert all(colors.lab(c)[0] <= 70 for c in picked)
    assert colors.distinct(8, taken) == picked  # deterministic
