"""Which part of a model's output is the logits.

Classifiers return logits in many wrappers: a tensor, a tuple or list (auxiliary outputs after the
main one), a dict or an object with a ``logits`` field (Hugging Face style), a named tuple
(torchvision's ``GoogLeNetOutputs``). The rule, in order:

1. a tensor is the logits;
2. an object or mapping with a ``logits`` entry: that entry;
3. a tuple or list (named tuples included): its first element that is logits by these rules;
4. a mapping without ``logits``: its only value that is a ``[B, classes]`` tensor.

Anything else is refused: guessing among several candidate tensors would explain the wrong thing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import UnsupportedModelError


def logits_of(output: object) -> torch.Tensor:
    """The logits in a model's ``output`` (see the module doc).

    Raises:
        UnsupportedModelError: no tensor found, or several candidates in a mapping.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return logits_of(output["logits"])
    named = getattr(output, "logits", None)
    if isinstance(named, torch.Tensor):
        return named
    if isinstance(output, (tuple, list)):
        for item in output:
            try:
                return logits_of(item)
            except UnsupportedModelError:
                continue
    if isinstance(output, Mapping):
        candidates = [value for value in output.values() if isinstance(value, torch.Tensor) and value.dim() == 2]
        if len(candidates) == 1:
            return candidates[0]
        raise UnsupportedModelError(
            f"the model returned a mapping with keys {sorted(map(str, output))[:10]}: name its logits 'logits'")
    raise UnsupportedModelError(f"cannot find logits in a model output of type {type(output).__name__}")
