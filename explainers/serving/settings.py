"""A served model's settings: the ``handler:`` section of its ``model-config.yaml``.

Validated strictly when the model loads, so a typo in a config fails the load loudly instead of
silently serving defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import InvalidOptionError
from ..registry import available, explainer_class


@dataclass(frozen=True)
class CostCaps:
    """Upper bounds on the work one request may ask for (explanations are expensive)."""

    max_image_pixels: int = 16_000_000
    max_explainers_per_request: int = 3
    max_explained_classes: int = 3
    max_integrated_gradients_steps: int = 128
    max_smoothgrad_samples: int = 50
    max_occlusion_evaluations: int = 1024
    max_top_k: int = 10
    # Rows one forward pass of a batched method may take (integrated_gradients internal_batch_size,
    # else n_steps; smoothgrad batch_size, else samples; occlusion perturbations_per_eval): bounds
    # the memory a request can make a worker allocate at once.
    max_batch_per_forward: int = 128
    # Side of the grid maps are averaged down to before they leave the server (None: full maps).
    coarse_output: int | None = None
    # Deletion steps a request's quality score may cost (steps + 1 extra forwards of the image);
    # 0 turns quality scores off for the model.
    max_quality_steps: int = 16

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "coarse_output" and value is None:
                continue
            if spec.name == "max_quality_steps" and value == 0 and not isinstance(value, bool):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"caps.{spec.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ServingSettings:
    input_size: tuple[int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
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
        size = section["input_size"]
        if isinstance(size, int):
            size = (size, size)
        if not (isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise InvalidOptionError(f"input_size must be [height, width] in pixels, got {size!r}")
        section["input_size"] = tuple(size)
        for key in ("mean", "std"):
            if key in section:
                values = section[key]
                if not (isinstance(values, Sequence) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)):
                    raise InvalidOptionError(f"{key} must list 3 numbers (R, G, B), got {values!r}")
                section[key] = tuple(float(v) for v in values)
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
        if self.envelope not in (None, "kserve", "kservev2"):
            raise InvalidOptionError(f"envelope must be kserve or kservev2 when set, got {self.envelope!r}")
        if not isinstance(self.render, Mapping):
            raise InvalidOptionError(f"render must be a mapping of rendering options, got {self.render!r}")
        if isinstance(self.quality_steps, bool) or not isinstance(self.quality_steps, int) or self.quality_steps < 1:
            raise InvalidOptionError(f"quality_steps must be a positive integer, got {self.quality_steps!r}")
        cap = self.caps.max_quality_steps
        if cap and self.quality_steps > cap:
            raise InvalidOptionError(f"quality_steps={self.quality_steps} is over caps.max_quality_steps={cap}")

    @property
    def allowed(self) -> tuple[str, ...]:
        """The explainers a request may ask for (all registered ones when not configured)."""
        return self.allowed_explainers or tuple(available())


def load_class_names(spec: object, base_dir: Path = Path(".")) -> list[str]:
    """Class names from a list, or from a JSON file (a path relative to ``base_dir``) holding a list
    or TorchServe's ``{"0": "cat", ...}``, whose values may also be ``[wordnet_id, label]`` pairs.

    Raises:
        InvalidOptionError: the file is missing or malformed, or the names are empty or repeated.
    """
    if isinstance(spec, (str, Path)):
        path = base_dir / spec
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise InvalidOptionError(f"cannot read class names from {path}: {error}") from None
    if isinstance(spec, Mapping):
        try:
            by_index = {int(key): value for key, value in spec.items()}
        except ValueError:
            raise InvalidOptionError("class name file keys must be class indices") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise InvalidOptionError("class name indices must run 0..N-1 without gaps")
        # ImageNet-style files map to [wordnet_id, label]: the label is what users read.
        spec = [value[-1] if isinstance(value, list) and value else value for _, value in sorted(by_index.items())]
    if isinstance(spec, str) or not (isinstance(spec, Sequence) and spec and all(isinstance(name, str) and name for name in spec)):
        raise InvalidOptionError(f"class_names must be a non-empty list of names or a JSON file, got {spec!r}")
    if len(set(spec)) != len(spec):
        raise InvalidOptionError("class names must be unique")
    return list(spec)
