"""What an explainer returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Explanation:
    """Attributions for a batch.

    Attributes:
        attributions: ``[B, C, H, W]`` like the input (CAM methods: ``[B, 1, H, W]``, upsampled).
        target: LongTensor ``[B]``, the class explained for each row.
        method: the registry name of the explainer that made it.
        rule_sites: for methods with backward rules at activations, how many call sites of each
            activation kind (``relu``, ``gelu``, ...) the rule was applied to; empty otherwise.
        layer: the module a CAM method weighed (dotted name), else None.
    """

    attributions: torch.Tensor
    target: torch.Tensor
    method: str
    rule_sites: Mapping[str, int] = field(default_factory=dict)
    layer: str | None = None
