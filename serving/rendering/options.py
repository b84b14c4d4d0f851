"""Rendering options of an explanation: validated once, merged from model defaults and requests.

Every option is public API: a model's ``model-config.yaml`` sets defaults and a request may override
them, so each value is checked strictly here (type and range) and every failure is an
``InvalidOptionError`` whose message names the option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any, Literal, get_args

from serving.rendering.colormaps import DIVERGING_COLORMAPS, SEQUENTIAL_COLORMAPS
from explainers.errors import InvalidOptionError

Encoding = Literal["png", "overlay", "npy-f16", "json"]
Reduction = Literal["max_abs", "sum", "l2"]
Polarity = Literal["positive", "negative", "both"]
OverlayBase = Literal["original", "grayscale", "none"]
Frame = Literal["input", "image"]

ENCODINGS: tuple[str, ...] = get_args(Encoding)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
POLARITIES: tuple[str, ...] = get_args(Polarity)
OVERLAY_BASES: tuple[str, ...] = get_args(OverlayBase)
FRAMES: tuple[str, ...] = get_args(Frame)


@dataclass(frozen=True)
class RenderOptions:
    """How one attribution tensor becomes a response payload (see ``serving.rendering.encode``).

    Attributes:
        encoding: ``png`` (heat map), ``overlay`` (heat map blended over the input image, RGB PNG),
            ``npy-f16`` (raw attributions as a float16 ``.npy``), ``json`` (nested floats; small
            maps only).
        reduce: how the channels of a pixel become one value: ``max_abs``, ``sum`` or ``l2``.
        polarity: ``positive`` (evidence for the target), ``negative`` (evidence against it,
            shown as magnitude) or ``both`` (diverging map centred at 0).
        clip: ``(lower, upper)`` percentiles with ``0 <= lower < upper <= 100``: the display range.
        colormap: sequential map for ``positive``/``negative``: ``inferno``, ``hot`` or ``gray``.
        diverging_colormap: map for ``both``: ``coolwarm``, ``bwr`` or ``gray``. Keeping it apart
            from ``colormap`` lets a request switch polarity without also naming a map.
        overlay_base: what the heat map is blended over: ``original``, ``grayscale`` (luminance of
            the input) or ``none`` (black canvas; no input image needed).
        overlay_alpha: opacity of the heat colour at the strongest attribution, in ``[0, 1]``.
        coarse_size: ``None``, or the side of the grid the map is average-pooled to before
            encoding (at most the map's own size), to reveal less to untrusted clients.
    """

    encoding: Encoding = "png"
    reduce: Reduction = "max_abs"
    polarity: Polarity = "positive"
    clip: tuple[float, float] = (0.0, 99.9)
    colormap: str = "inferno"
    diverging_colormap: str = "coolwarm"
    overlay_base: OverlayBase = "original"
    overlay_alpha: float = 0.5
    coarse_size: int | None = None
    frame: Frame = "input"

    def __post_init__(self) -> None:
        _require_choice("encoding", self.encoding, ENCODINGS)
        _require_choice("reduce", self.reduce, REDUCTIONS)
        _require_choice("polarity", self.polarity, POLARITIES)
        _require_choice("colormap", self.colormap, tuple(SEQUENTIAL_COLORMAPS))
        _require_choice("diverging_colormap", self.diverging_colormap, tuple(DIVERGING_COLORMAPS))
        _require_choice("overlay_base", self.overlay_base, OVERLAY_BASES)
        _require_choice("frame", self.frame, FRAMES)
        # Frozen: normalise through object.__setattr__, once, so a YAML/JSON list becomes a tuple.
        object.__setattr__(self, "clip", _validated_clip(self.clip))
        object.__setattr__(self, "overlay_alpha", _validated_alpha(self.overlay_alpha))
        _require_coarse_size(self.coarse_size)

    @property
    def active_colormap(self) -> str:
        """The colour map this polarity uses: the diverging one for ``both``."""
        return self.diverging_colormap if self.polarity == "both" else self.colormap

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def from_mapping(
        cls, defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
    ) -> RenderOptions:
        """Merge a model's defaults with one request's overrides (overrides win), then validate.

        A request may make ``coarse_size`` coarser than the model's default, never finer or
        ``None``: a model configured to show untrusted clients a coarse map stays coarse.

        Raises:
            InvalidOptionError: either mapping is not a mapping, has an unknown key, or the merged
                options are invalid; or the request asks for a finer ``coarse_size`` than the
                model's default.
        """
        _require_known_keys(defaults, source="model defaults")
        if overrides is None:
            overrides = {}
        _require_known_keys(overrides, source="request")
        model_options = cls(**defaults)  # a model's defaults must be valid on their own
        options = cls(**{**defaults, **overrides})

        default_coarse = model_options.coarse_size
        if default_coarse is not None and (
            options.coarse_size is None or options.coarse_size > default_coarse
        ):
            raise InvalidOptionError(
                f"rendering option 'coarse_size': this model shows at most {default_coarse}x"
                f"{default_coarse} cells; a request may ask for fewer, got {options.coarse_size!r}"
            )
        return options


def _require_known_keys(options: Any, *, source: str) -> None:
    if not isinstance(options, Mapping):
        raise InvalidOptionError(
            f"rendering options from the {source} must be a mapping, got {type(options).__name__}"
        )
    known = RenderOptions.option_names()
    for key in options:
        if key not in known:
            raise InvalidOptionError(
                f"unknown rendering option {key!r} in the {source}; known options: {', '.join(known)}"
            )


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidOptionError(
            f"rendering option {name!r} must be one of {', '.join(choices)}; got {value!r}"
        )


def _is_real_number(value: Any) -> bool:
    # bool is an int subclass, but `true` is never a meaningful percentile or opacity.
    return isinstance(value, Real) and not isinstance(value, bool)


def _validated_clip(clip: Any) -> tuple[float, float]:
    if (
        isinstance(clip, (str, bytes))
        or not hasattr(clip, "__len__")
        or len(clip) != 2
        or not all(_is_real_number(bound) for bound in clip)
    ):
        raise InvalidOptionError(
            f"rendering option 'clip' must be two percentiles [lower, upper]; got {clip!r}"
        )
    lower, upper = float(clip[0]), float(clip[1])
    if not (math.isfinite(lower) and math.isfinite(upper) and 0.0 <= lower < upper <= 100.0):
        raise InvalidOptionError(
            f"rendering option 'clip' needs 0 <= lower < upper <= 100; got [{lower}, {upper}]"
        )
    return lower, upper


def _validated_alpha(alpha: Any) -> float:
    if not _is_real_number(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise InvalidOptionError(f"rendering option 'overlay_alpha' must be a number in [0, 1]; got {alpha!r}")
    return float(alpha)


def _require_coarse_size(coarse_size: Any) -> None:
    if coarse_size is None:
        return
    if not isinstance(coarse_size, int) or isinstance(coarse_size, bool) or coarse_size < 1:
        raise InvalidOptionError(
            f"rendering option 'coarse_size' must be null or a positive integer; got {coarse_size!r}"
        )
