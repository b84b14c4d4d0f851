"""RenderOptions: strict validation at construction and the defaults/overrides merge."""

import dataclasses

import pytest

from explainers.errors import InvalidOptionError
from serving.rendering.options import RenderOptions


def test_defaults():
    options = RenderOptions()
    assert (options.encoding, options.reduce, options.polarity) == ("png", "max_abs", "positive")
    assert options.clip == (0.0, 99.9)
    assert (options.colormap, options.diverging_colormap) == ("inferno", "coolwarm")
    assert (options.overlay_base, options.overlay_alpha, options.coarse_size) == ("original", 0.5, None)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RenderOptions().encoding = "json"


def test_a_list_clip_from_yaml_or_json_becomes_a_float_tuple():
    options = RenderOptions(clip=[1, 99])
    assert options.clip == (1.0, 99.0) and all(type(bound) is float for bound in options.clip)


def test_polarity_picks_the_colormap_family():
    assert RenderOptions(polarity="negative", colormap="hot").active_colormap == "hot"
    assert RenderOptions(polarity="both", colormap="hot", diverging_colormap="bwr").active_colormap == "bwr"


@pytest.mark.parametrize(
    ("name", "bad_value"),
    [
        ("encoding", "jpeg"),
        ("encoding", None),
        ("reduce", "mean"),
        ("polarity", "absolute"),
        ("polarity", 1),
        ("clip", (50, 50)),
        ("clip", (60, 40)),
        ("clip", (-1, 99)),
        ("clip", (0, 100.5)),
        ("clip", (0, float("nan"))),
        ("clip", (0,)),
        ("clip", "0,99"),
        ("clip", (True, 99)),
        ("clip", 99),
        ("colormap", "coolwarm"),  # a diverging map cannot show a one-sided map
        ("diverging_colormap", "inferno"),
        ("overlay_base", "white"),
        ("overlay_alpha", 1.5),
        ("overlay_alpha", -0.1),
        ("overlay_alpha", "0.5"),
        ("overlay_alpha", True),
        ("overlay_alpha", float("nan")),
        ("coarse_size", 0),
        ("coarse_size", 8.0),
        ("coarse_size", "8"),
        ("coarse_size", True),
    ],
)
def test_each_invalid_value_is_rejected_with_the_option_named(name, bad_value):
    with pytest.raises(InvalidOptionError, match=f"'{name}'"):
        RenderOptions(**{name: bad_value})


def test_the_error_maps_to_http_400():
    with pytest.raises(InvalidOptionError) as caught:
        RenderOptions(encoding="gif")
    assert caught.value.http_status == 400 and caught.value.code == "invalid_option"


def test_from_mapping_merges_with_overrides_winning():
    options = RenderOptions.from_mapping(
        {"encoding": "overlay", "polarity": "both", "clip": [0, 99]}, {"polarity": "negative", "overlay_alpha": 0.7}
    )
    assert (options.encoding, options.polarity, options.clip, options.overlay_alpha) == (
        "overlay",
        "negative",
        (0.0, 99.0),
        0.7,
    )
    assert RenderOptions.from_mapping({}, None) == RenderOptions()


@pytest.mark.parametrize(
    ("defaults", "overrides", "message"),
    [
        ({"colour": "red"}, None, "unknown rendering option 'colour' in the model defaults"),
        ({}, {"encodng": "png"}, "unknown rendering option 'encodng' in the request"),
        ({}, ["encoding"], "from the request must be a mapping"),
        (None, {}, "from the model defaults must be a mapping"),
        ({}, {"overlay_alpha": "high"}, "'overlay_alpha'"),
        ({"encoding": "bmp"}, {"encoding": "png"}, "'encoding'"),  # defaults must be valid on their own
    ],
)
def test_from_mapping_rejects_unknown_keys_and_bad_values(defaults, overrides, message):
    with pytest.raises(InvalidOptionError, match=message):
        RenderOptions.from_mapping(defaults, overrides)


def test_a_request_may_coarsen_but_never_refine_the_models_coarse_size():
    defaults = {"coarse_size": 8}
    assert RenderOptions.from_mapping(defaults, {"coarse_size": 4}).coarse_size == 4
    assert RenderOptions.from_mapping(defaults, {"coarse_size": 8}).coarse_size == 8
    for finer in (9, None):
        with pytest.raises(InvalidOptionError, match="'coarse_size'"):
            RenderOptions.from_mapping(defaults, {"coarse_size": finer})
    # without a model default, any grid (or none) is fine
    assert RenderOptions.from_mapping({}, {"coarse_size": 16}).coarse_size == 16
