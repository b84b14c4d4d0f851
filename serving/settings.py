"""A served model's settings: the ``handler:`` section of its ``model-config.yaml``.

Validated strictly when the model loads, so a typo in a config fails the load loudly instead of
silently serving defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from explainers.errors import InvalidOptionError
from explainers.registry import available, explainer_class

from .caps import CostCaps
from .class_names import load_class_names
from .images import INTERPOLATIONS
from .sanity import SanitySettings, check_policy


@dataclass(frozen=True)
class ServingSettings:
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    # Shorter image side before the centre crop to input_size (torchvision's Resize + CenterCrop);
    # None resizes straight to input_size.
    resize: int | None = None
    # Pillow filter of the resize: bilinear, bicubic or nearest.
    interpolation: str = "bilinear"
    # "torchvision:NAME" or "timm:NAME": the handler builds that architecture (no model file
    # needed) and loads the archive's state dict into it. None: the archive's model file.
    architecture: str | None = None
    top_k: int = 3
    default_explainers: tuple[str, ...] = ("guided_backprop",)
    allowed_explainers: tuple[str, ...] = ()
    explainer_options: Mapping[str, Mapping] = field(default_factory=dict)
    render: Mapping[str, object] = field(default_factory=dict)
    caps: CostCaps = field(default_factory=CostCaps)
    # Deletion steps of a quality score when a request asks with "quality": true.
    quality_steps: int = 8
    # TorchServe's service_envelope when it is set ("kserve" or "kservev2"): requests then arrive
    # as KServe instances. It must match the server's config.properties.
    envelope: str | None = None
    # What a failed sanity check of an explainer does to the requests asking for it (serving/sanity.py):
    # report (verdicts in responses and describe), warn (also a warning per entry), refuse (403).
    sanity_policy: str = "report"
    sanity: SanitySettings = field(default_factory=SanitySettings)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_mapping(cls, section: Mapping, base_dir: Path | str = ".") -> "ServingSettings":
        """Settings from a ``handler:`` mapping; ``class_names`` may name a JSON file in ``base_dir``.

        Raises:
            InvalidOptionError: an unknown key or a bad value.
        """
        section = dict(section or {})
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise InvalidOptionError(f"unknown handler setting(s) {unknown}; known: {sorted(known)}")
        for required in ("input_size", "class_names"):
            if required not in section:
                raise InvalidOptionError(f"handler setting {required!r} is required")
        section["class_names"] = tuple(load_class_names(section["class_names"], Path(base_dir)))
        section["input_size"] = parse_input_size(section["input_size"])
        if ("mean" in section) != ("std" in section):
            raise InvalidOptionError("give both mean and std, or neither")
        for key in ("mean", "std"):
            if key in section:
                section[key] = channel_values(key, section[key])
        if any(v <= 0 for v in section.get("std", (1.0,))):
            raise InvalidOptionError("std values must be positive")
        for key in ("default_explainers", "allowed_explainers"):
            if key in section:
                names = section[key]
                if isinstance(names, str) or not isinstance(names, Sequence):
                    raise InvalidOptionError(f"{key} must be a list of explainer names, got {names!r}")
                for name in names:
                    explainer_class(name)  # UnknownExplainerError names the available ones
                section[key] = tuple(names)
        caps = section.get("caps", {})
        if not isinstance(caps, Mapping):
            raise InvalidOptionError(f"caps must be a mapping, got {caps!r}")
        try:
            section["caps"] = CostCaps(**caps)
        except TypeError:
            raise InvalidOptionError(f"unknown cap(s) in {sorted(caps)}; known: {[f.name for f in fields(CostCaps)]}") from None
        if "sanity" in section:
            section["sanity"] = SanitySettings.from_mapping(section["sanity"])
        settings = cls(**section)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.num_classes < 1:
            raise InvalidOptionError("class_names must not be empty")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_classes:
            raise InvalidOptionError(f"top_k must be in [1, {self.num_classes}], got {self.top_k!r}")
        allowed = self.allowed
        not_allowed = sorted(set(self.default_explainers) - set(allowed))
        if not_allowed:
            raise InvalidOptionError(f"default explainers {not_allowed} are not in allowed_explainers")
        if not isinstance(self.explainer_options, Mapping) or not all(
                isinstance(v, Mapping) for v in self.explainer_options.values()):
            raise InvalidOptionError("explainer_options must map explainer names to option mappings")
        for name in self.explainer_options:
            explainer_class(name)
        self._check_preprocessing()
        if self.architecture is not None:
            parse_architecture(self.architecture)
        check_policy(self.sanity_policy)
        if self.envelope not in (None, "kserve", "kservev2"):
            raise InvalidOptionError(f"envelope must be kserve or kservev2 when set, got {self.envelope!r}")
        if not isinstance(self.render, Mapping):
            raise InvalidOptionError(f"render must be a mapping of rendering options, got {self.render!r}")
        if isinstance(self.quality_steps, bool) or not isinstance(self.quality_steps, int) or self.quality_steps < 1:
            raise InvalidOptionError(f"quality_steps must be a positive integer, got {self.quality_steps!r}")
        cap = self.caps.max_quality_steps
        if cap and self.quality_steps > cap:
            raise InvalidOptionError(f"quality_steps={self.quality_steps} is over caps.max_quality_steps={cap}")

    def _check_preprocessing(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidOptionError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize is None:
            return
        if isinstance(self.resize, bool) or not isinstance(self.resize, int) or self.resize < 1:
            raise InvalidOptionError(f"resize must be a positive integer (the shorter image side), got {self.resize!r}")
        if self.resize < max(self.input_size):
            raise InvalidOptionError(
                f"resize ({self.resize}) must be at least the larger side of input_size {list(self.input_size)}: "
                "the centre crop is taken from the resized image")

    @property
    def allowed(self) -> tuple[str, ...]:
        """The explainers a request may ask for (all registered ones when not configured)."""
        return self.allowed_explainers or tuple(available())


ARCHITECTURE_SOURCES = ("torchvision", "timm")


def parse_architecture(spec: object) -> tuple[str, str]:
    """``"torchvision:resnet50"`` -> ``("torchvision", "resnet50")``.

    Only the form is checked here; whether the library has that model is found when it is built.

    Raises:
        InvalidOptionError: not ``SOURCE:NAME`` with a known source and a non-empty name.
    """
    source, _, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if source not in ARCHITECTURE_SOURCES or not name.strip() or name != name.strip():
        raise InvalidOptionError(
            f"architecture must be 'torchvision:NAME' or 'timm:NAME' (e.g. torchvision:resnet50), got {spec!r}")
    return source, name


def parse_input_size(size: object) -> tuple[int, int]:
    """``224`` -> ``(224, 224)``; ``[H, W]`` -> ``(H, W)``.

    Raises:
        InvalidOptionError: anything but a positive integer or two of them.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise InvalidOptionError(f"input_size must be [height, width] in pixels (or one side), got {size!r}")
    return int(size[0]), int(size[1])


def channel_values(name: str, values: object) -> tuple[float, float, float]:
    """Per-channel normalisation values: 3 numbers (R, G, B), or 1 used for all three.

    Raises:
        InvalidOptionError: another count, or not numbers.
    """
    if not (isinstance(values, Sequence) and not isinstance(values, str) and len(values) in (1, 3)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise InvalidOptionError(f"{name} must list 3 numbers (R, G, B) or 1 for all channels, got {values!r}")
    floats = tuple(float(v) for v in values)
    return floats * 3 if len(floats) == 1 else floats
