"""Class names of a served model, in the forms users have them (no torch import: tools use it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from explainers.errors import InvalidOptionError


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
