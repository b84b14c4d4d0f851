"""What an explainer returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Explanation:
    """Attributions for a batch.

    Attributes:
        attributions: ``[B, C, H, W]`` like the input (CAM methods: ``[B, 1, H, W]``, upsampled).
        target: LongTensor ``[B]``, the class explained for each row.
        method: the registry name of the explainer that made it.
    """

    attributions: torch.Tensor
    target: torch.Tensor
    method: str
