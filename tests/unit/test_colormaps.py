"""Colour lookup tables: interpolation arithmetic and the shape of the shipped maps."""

import numpy as np
import pytest

from serving.rendering.colormaps import DIVERGING_COLORMAPS, SEQUENTIAL_COLORMAPS, build_lut, colormap_lut


def test_two_anchor_black_to_white_is_the_identity_ramp():
    lut = build_lut([(0, 0, 0), (255, 255, 255)])
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[:, 0], np.arange(256))


def test_three_anchor_map_interpolates_each_half_linearly():
    lut = build_lut([(0, 0, 255), (255, 255, 255), (255, 0, 0)])
    # entry 127 sits at 127/255 of the way, i.e. 0.99608 of the first half: 255 * 0.99608 = 254.0
    assert tuple(lut[127]) == (254, 254, 255)
    # entry 64: 64/255 / 0.5 = 0.50196 -> 128.0
    assert tuple(lut[64]) == (128, 128, 255)
    assert tuple(lut[0]) == (0, 0, 255) and tuple(lut[255]) == (255, 0, 0)


def test_inferno_hits_its_anchors_and_interpolates_between_them():
    inferno = colormap_lut("inferno", diverging=False)
    assert tuple(inferno[0]) == (0, 0, 4)
    assert tuple(inferno[255]) == (252, 255, 164)
    # 128/255 * 9 = 4.5176: 51.76 % of the way from (165, 44, 96) to (207, 68, 70)
    assert tuple(inferno[128]) == (187, 56, 83)


def test_sequential_maps_get_brighter_from_low_to_high():
    weights = np.array([0.299, 0.587, 0.114])
    for name, lut in SEQUENTIAL_COLORMAPS.items():
        luminance = lut.astype(float) @ weights
        assert np.all(np.diff(luminance) >= 0), name
        assert luminance[-1] - luminance[0] > 200, name


def test_diverging_maps_are_lightest_at_the_centre_and_blue_to_red():
    for name in ("coolwarm", "bwr"):
        lut = DIVERGING_COLORMAPS[name].astype(int)
        assert lut[0, 2] > lut[0, 0] and lut[255, 0] > lut[255, 2], name  # blue low, red high
        brightness = lut.sum(axis=1)
        assert brightness.argmax() in (127, 128), name
    assert tuple(DIVERGING_COLORMAPS["coolwarm"][0]) == (59, 76, 192)


def test_shared_tables_are_read_only():
    with pytest.raises(ValueError):
        SEQUENTIAL_COLORMAPS["inferno"][0, 0] = 1


def test_unknown_name_or_wrong_family_is_a_key_error():
    with pytest.raises(KeyError):
        colormap_lut("coolwarm", diverging=False)
    with pytest.raises(KeyError):
        colormap_lut("inferno", diverging=True)


@pytest.mark.parametrize("anchors", [[(0, 0, 0)], [(0, 0), (1, 1)], [(0, 0, 0), (256, 0, 0)], [(-1, 0, 0), (0, 0, 0)]])
def test_bad_anchors_are_rejected(anchors):
    with pytest.raises(ValueError):
        build_lut(anchors)
