"""The explainer interface every registered method implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from .forward_record import ForwardRecord


class Explainer(abc.ABC):
    """Explains a classifier's decisions about image batches.

    Subclasses implement :meth:`attribute`; :meth:`explain` validates inputs and targets, runs in
    eval mode and restores the model afterwards. Options are keyword-only constructor arguments.
    """

    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model

    @abc.abstractmethod
    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Attributions for validated ``inputs`` ``[B, C, H, W]`` and resolved ``targets`` ``[B]``.

        Called with the model in eval mode and autograd enabled.
        """

    def explain(self, inputs: torch.Tensor, target=None):
        """Explain ``inputs`` for ``target`` (None: each row's top-1 class).

        Raises:
            InvalidInputError: inputs not a finite float tensor ``[B, C, H, W]``.
            InvalidTargetError: target of the wrong type, length or out of range.
        """
        from .api import predict_and_explain  # the one code path for every explanation

        _, explanations = predict_and_explain(self.model, inputs, [self], target=target)
        return explanations[self.name]


class GradientRuleExplainer(Explainer):
    """A method computed from backward passes over a shared :class:`ForwardRecord`."""

    def layers(self) -> list[str]:
        """Names of the layers whose activations the forward must capture."""
        return []

    @abc.abstractmethod
    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        """Attributions from backward passes over ``record``."""

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.attribute_from_record(ForwardRecord(self.model, inputs, self.layers()), targets)
