"""Class and input sensitivity: does the map change with the class explained, and with the image?

Nie et al. (2018) showed that guided backprop and DeconvNet reconstruct the image rather than the
decision, so their maps barely change with the target class. ``class_map_similarity`` measures that
directly (in the spirit of Rebuffi et al. 2020): the Spearman rank correlation between the
importance maps for each image's top-1 class and for its least likely class. High (near 1) means
the map ignores the class; low means it is class-sensitive.

The converse failure is a map that ignores the *image*: ``image_map_similarity`` compares the maps
of two different images explained for the same class. A backward pass that never reads the input
(DeconvNet in a network without max-pooling switches, whose backward ReLU rule ignores the
forward activations) draws nearly the same pattern for every image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Explainer
from ..errors import InvalidInputError
from ..explanation import Explanation
from ..hygiene import explanation_mode
from ..outputs import logits_of
from ..validation import validate_inputs
from .maps import importance_map, rank_similarity, signed_map


@dataclass(frozen=True)
class ClassSensitivity:
    """Attributes:
        top: explanation of each row's most likely class.
        least: explanation of each row's least likely class.
        similarity: ``[B]`` Spearman rank correlation of the two importance maps (``Σ_c |a_c|``;
            see :func:`rank_similarity` for constant maps).
        signed_similarity: ``[B]`` the same on the signed maps ``Σ_c a_c``.
    """

    top: Explanation
    least: Explanation
    similarity: torch.Tensor
    signed_similarity: torch.Tensor


def top_and_least_likely(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B], [B])`` LongTensors: each row's most and least likely class."""
    return logits.argmax(dim=1), logits.argmin(dim=1)


def class_map_similarity(explainer: Explainer, inputs: torch.Tensor) -> ClassSensitivity:
    """Explains every row for its top-1 and its least likely class and compares the two maps.

    Raises:
        InvalidInputError: inputs not a finite float tensor ``[B, C, H, W]``.
    """
    model = explainer.model
    inputs = validate_inputs(inputs, model)
    with explanation_mode(model), torch.no_grad():
        logits = logits_of(model(inputs))
    top, least = top_and_least_likely(logits)
    top_explanation = explainer.explain(inputs, top)
    least_explanation = explainer.explain(inputs, least)
    top_maps, least_maps = top_explanation.attributions, least_explanation.attributions
    return ClassSensitivity(top_explanation, least_explanation,
                            rank_similarity(importance_map(top_maps), importance_map(least_maps)),
                            rank_similarity(signed_map(top_maps), signed_map(least_maps)))


def image_map_similarity(explainer: Explainer, inputs: torch.Tensor, targets: torch.Tensor,
                         maps: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` rank similarity of each row's map and the map of the next row's image (cyclically),
    both explained for this row's target class. Positions and shapes differ between the images,
    so a map that follows the image scores near 0.

    Args:
        maps: ``[B, H, W]`` importance maps of ``inputs`` for ``targets``, if already computed.

    Raises:
        InvalidInputError: fewer than two rows, or inputs not a finite float tensor ``[B, C, H, W]``.
    """
    inputs = validate_inputs(inputs, explainer.model)
    if inputs.shape[0] < 2:
        raise InvalidInputError("image_map_similarity needs at least two images")
    if maps is None:
        maps = importance_map(explainer.explain(inputs, targets).attributions)
    others = importance_map(explainer.explain(torch.roll(inputs, shifts=-1, dims=0), targets).attributions)
    return rank_similarity(maps, others)
