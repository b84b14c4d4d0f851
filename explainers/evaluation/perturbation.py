"""Deletion and insertion curves (Petsiuk et al. 2018, RISE): is the map's ranking the model's?

Pixels are moved, most important first, from one image to another, and the model's softmax
probability for the explained class is traced at every step:

- deletion: original -> baseline. A faithful map removes the evidence first, so the probability
  falls fast and the area under the curve is **small** (lower is better).
- insertion: baseline -> original. A faithful map restores the evidence first, so the probability
  rises fast and the area is **large** (higher is better).

The x axis is the fraction of pixels moved, from 0 to 1, so both areas lie in [0, 1] (trapezoid
rule). A pixel is moved in all its channels at once; pixels are ranked by
:func:`~explainers.evaluation.maps.importance_map`, ties (flat regions of a map) in raster order.
All steps of a batch of images are evaluated together in batched forward passes of ``batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, InvalidOptionError, InvalidTargetError
from ..hygiene import explanation_mode
from ..options import positive_int
from ..outputs import logits_of
from ..validation import model_device

DEFAULT_STEPS = 32
DEFAULT_BATCH_SIZE = 128


@dataclass(frozen=True)
class PerturbationCurve:
    """The target's probability as pixels are moved in importance order.

    Attributes:
        fractions: ``[S + 1]`` share of the pixels moved before each evaluation, 0 first, 1 last.
        probabilities: ``[B, S + 1]`` softmax probability of each row's target at each step.
    """

    fractions: torch.Tensor
    probabilities: torch.Tensor

    @property
    def auc(self) -> torch.Tensor:
        """``[B]`` area under each row's curve, in [0, 1] (trapezoid rule over ``fractions``)."""
        return torch.trapezoid(self.probabilities, self.fractions, dim=1)


def constant_baseline(inputs: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """A baseline of one value everywhere, in model-input space.

    For a model fed mean/std-normalised images, 0 is the dataset's mean colour.
    """
    return torch.full_like(inputs, float(value))


def blurred_baseline(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each image Gaussian-blurred with standard deviation ``sigma`` pixels (replicated borders).

    RISE's insertion baseline: a blurred image keeps the colours and the overall layout, so the
    curve measures how quickly the map restores the *shape* evidence, not the colours.

    Raises:
        InvalidOptionError: ``sigma`` not a positive number.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise InvalidOptionError(f"blur sigma must be a positive number of pixels, got {sigma!r}")
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=inputs.dtype, device=inputs.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    batch, channels, height, width = inputs.shape
    planes = inputs.detach().reshape(batch * channels, 1, height, width)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return planes.reshape(batch, channels, height, width)


def deletion_curve(model: nn.Module, inputs: torch.Tensor, importance: torch.Tensor, targets: torch.Tensor, *,
                   baseline: torch.Tensor | None = None, steps: int = DEFAULT_STEPS,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> PerturbationCurve:
    """Original -> ``baseline`` (default: the constant 0 of :func:`constant_baseline`), most important first.

    Args:
        model: classifier returning logits ``[B, classes]``; evaluated in eval mode, never changed.
        inputs: model inputs ``[B, C, H, W]``.
        importance: ``[B, H, W]`` map ranking the pixels (see ``importance_map``).
        targets: LongTensor ``[B]``, the class whose probability is traced.
        baseline: ``[B, C, H, W]`` values the removed pixels take.
        steps: evaluations after the original; pixel ``round(k·HW/steps)`` counts, ``k = 0..steps``.
        batch_size: images per forward pass.

    Raises:
        InvalidInputError: shapes that do not match.
        InvalidTargetError: targets not a LongTensor ``[B]`` of classes the model has.
        InvalidOptionError: ``steps`` or ``batch_size`` not a positive integer, or more steps than pixels.
    """
    baseline = constant_baseline(inputs) if baseline is None else baseline
    return _curve(model, inputs, baseline, importance, targets, steps, batch_size)


def insertion_curve(model: nn.Module, inputs: torch.Tensor, importance: torch.Tensor, targets: torch.Tensor, *,
                    baseline: torch.Tensor, steps: int = DEFAULT_STEPS,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> PerturbationCurve:
    """``baseline`` (e.g. :func:`blurred_baseline`) -> original, most important pixels first.

    Arguments and errors as :func:`deletion_curve`; the baseline is required, since the natural
    start (a blurred copy) depends on the data.
    """
    return _curve(model, baseline, inputs, importance, targets, steps, batch_size)


def _curve(model: nn.Module, start: torch.Tensor, end: torch.Tensor, importance: torch.Tensor,
           targets: torch.Tensor, steps: int, batch_size: int) -> PerturbationCurve:
    """At step k the ``count_k`` most important pixels hold ``end``'s values, the rest ``start``'s."""
    _check_shapes(start, end, importance, targets)
    steps, batch_size = positive_int("steps", steps), positive_int("batch_size", batch_size)
    rows, _, height, width = start.shape
    pixels = height * width
    if steps > pixels:
        raise InvalidOptionError(f"steps={steps} is more than the {pixels} pixels of the image")
    device = model_device(model)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * pixels / steps).long()
    fractions = counts.double() / pixels
    order = torch.argsort(importance.detach().flatten(1).cpu(), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels).expand(rows, pixels).contiguous())
    # moved[b, k, p]: pixel p of row b holds the end image's value at step k.
    moved = ranks[:, None, :] < counts[None, :, None]
    images_per_pass = max(1, batch_size // (steps + 1))
    probabilities = []
    with explanation_mode(model), torch.no_grad():
        for first in range(0, rows, images_per_pass):
            chunk = slice(first, first + images_per_pass)
            mask = moved[chunk].view(-1, steps + 1, 1, height, width).to(device)
            frames = torch.where(mask, end[chunk, None].to(device), start[chunk, None].to(device))
            logits = logits_of(model(frames.flatten(0, 1))).view(mask.shape[0], steps + 1, -1)
            if int(targets.max()) >= logits.shape[-1]:
                raise InvalidTargetError(f"target class index out of range [0, {logits.shape[-1]}): {targets.tolist()}")
            chosen = targets[chunk].to(device).view(-1, 1, 1).expand(-1, steps + 1, 1)
            probabilities.append(torch.softmax(logits.float(), dim=-1).gather(2, chosen).squeeze(2).cpu())
    return PerturbationCurve(fractions, torch.cat(probabilities).double())


def _check_shapes(start: torch.Tensor, end: torch.Tensor, importance: torch.Tensor, targets: torch.Tensor) -> None:
    for name, tensor in (("inputs", start), ("baseline", end)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not tensor.is_floating_point():
            raise InvalidInputError(f"{name} must be a float tensor [B, C, H, W]")
    if start.shape != end.shape:
        raise InvalidInputError(f"baseline shape {list(end.shape)} differs from the inputs' {list(start.shape)}")
    rows, _, height, width = start.shape
    if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (rows, height, width):
        raise InvalidInputError(f"importance must be a [B, H, W] = {[rows, height, width]} map, got "
                                f"{list(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long or tuple(targets.shape) != (rows,):
        raise InvalidTargetError(f"targets must be a LongTensor [{rows}]")
    if bool((targets < 0).any()):
        raise InvalidTargetError(f"target class indices must not be negative: {targets.tolist()}")
