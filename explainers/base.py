"""The explainer interface every registered method implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .kernels.forward_record import ForwardRecord
from .run import ExplanationRun


@dataclass(frozen=True)
class Cost:
    """What one explanation of one input row costs, beyond the forward pass it may share.

    ``evaluations`` rows of the model are run (forward, and backward where the method needs one)
    in passes of at most ``rows_per_forward`` rows. ``evaluations_option`` and ``batch_option`` name
    the options a client changes to lower them (None where no option does). ``backward_to_layer``:
    the backward passes stop at a layer instead of reaching the input (CAM methods), and one is
    shared by every method of a request that weighs the same layer for the same targets.
    """

    evaluations: int = 0
    backward_passes: int = 1
    rows_per_forward: int = 1
    evaluations_option: str | None = None
    batch_option: str | None = None
    backward_to_layer: bool = False


class Explainer(abc.ABC):
    """Explains a classifier's decisions about image batches.

    Subclasses implement :meth:`attribute`; :meth:`explain` validates inputs and targets, runs in
    eval mode and restores the model afterwards. Options are keyword-only constructor arguments.
    """

    name: ClassVar[str] = ""
    # Whether the method runs backward passes over the forward pass the prediction made.
    shares_forward: ClassVar[bool] = False
    # Whether the method puts backward rules at activations (its explanations report the sites).
    applies_rules: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    def cost(self, height: int, width: int) -> Cost:
        """What explaining one ``height`` x ``width`` row costs (default: one forward, one backward).

        Methods that run the model more often say so: cost caps bound every method by this.

        Raises:
            InvalidOptionError: the options cannot explain an input of that size.
        """
        return Cost(evaluations=1, backward_passes=1, rows_per_forward=1)

    def layers(self, inputs: torch.Tensor) -> list[str]:
        """Names of the layers whose activations the shared forward of ``inputs`` must capture."""
        return []

    @property
    def explained_layer(self) -> str | None:
        """The layer the method weighed (CAM methods), once known."""
        return None

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
        return ExplanationRun.explain_one(self.model, inputs, self, target)


class GradientRuleExplainer(Explainer):
    """A method computed from backward passes over a shared :class:`ForwardRecord`."""

    shares_forward = True
    # Whether the method applies rules at layer sites (relevance methods): the shared forward then
    # runs the rule model with layer sites (kernels/layer_sites.py).
    needs_layer_sites: ClassVar[bool] = False

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=0, backward_passes=1, rows_per_forward=1)

    @abc.abstractmethod
    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        """Attributions from backward passes over ``record``."""

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        record = ForwardRecord(self.model, inputs, self.layers(inputs), layer_sites=self.needs_layer_sites)
        return self.attribute_from_record(record, targets)
