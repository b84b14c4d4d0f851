"""From attributions to the one importance map every quality metric reads, and rank similarity.

Channel reduction, chosen once for every metric: a pixel's importance is the **sum over channels of
the absolute attribution**, ``Σ_c |a_c|``. Absolute values because the sign of a gradient map says
which way a pixel would have to move, not whether it matters (Simonyan et al. 2013 and Adebayo et
al. 2018 rank by magnitude too), and the sum because evidence in any colour channel counts. CAM maps
``[B, 1, H, W]`` are already one non-negative channel and pass through unchanged.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError


def importance_map(attributions: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` attributions -> ``[B, H, W]`` float importance, ``Σ_c |a_c|``.

    Raises:
        InvalidInputError: not a 4-D floating point tensor.
    """
    if not isinstance(attributions, torch.Tensor) or attributions.dim() != 4 or not attributions.is_floating_point():
        raise InvalidInputError(f"attributions must be a float tensor [B, C, H, W], got {_describe(attributions)}")
    return attributions.detach().abs().sum(dim=1).float()


def signed_map(attributions: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H, W]`` signed channel sum ``Σ_c a_c`` (for the signed similarity extras).

    Raises:
        InvalidInputError: not a 4-D floating point tensor.
    """
    importance_map(attributions)  # same checks
    return attributions.detach().sum(dim=1).float()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..n`` of a 1-D tensor, ties sharing the mean of their ranks (as Spearman's rho needs).

    Maps with large flat regions (a Grad-CAM map is exactly zero wherever its ReLU cut) would
    otherwise be ranked by pixel index, which invents an order that is not in the map.
    """
    unique, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).to(torch.float64)
    mean_rank = last_rank - (counts.to(torch.float64) - 1) / 2
    return mean_rank[inverse]


def spearman(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row pair of ``[B, ...]`` maps -> ``[B]`` (float64).

    A row where either map is constant has no ranking to compare: its value is NaN, and callers
    leave it out of their means (and count it).

    Raises:
        InvalidInputError: the two batches differ in shape.
    """
    if first.shape != second.shape:
        raise InvalidInputError(f"maps to compare differ in shape: {list(first.shape)} and {list(second.shape)}")
    first, second = first.detach().flatten(1).cpu(), second.detach().flatten(1).cpu()
    values = []
    for row_a, row_b in zip(first, second):
        ranks_a, ranks_b = average_ranks(row_a), average_ranks(row_b)
        ranks_a, ranks_b = ranks_a - ranks_a.mean(), ranks_b - ranks_b.mean()
        norm = torch.sqrt((ranks_a * ranks_a).sum() * (ranks_b * ranks_b).sum())
        values.append((ranks_a * ranks_b).sum() / norm if norm > 0 else torch.tensor(float("nan"), dtype=torch.float64))
    return torch.stack(values)


def rank_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[B]`` Spearman correlation of map pairs, with a convention for maps that rank nothing.

    A constant map (a Grad-CAM map the ReLU cut to zero everywhere, say) keeps none of the other
    map's ranking, so against a non-constant map it scores 0; two constant maps stay NaN (no
    evidence either way) and are left out of means.

    Raises:
        InvalidInputError: the two batches differ in shape.
    """
    values = spearman(first, second)
    flat_first, flat_second = first.detach().flatten(1).cpu(), second.detach().flatten(1).cpu()
    constant_first = (flat_first == flat_first[:, :1]).all(dim=1)
    constant_second = (flat_second == flat_second[:, :1]).all(dim=1)
    return torch.where(constant_first ^ constant_second, torch.zeros_like(values), values)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
