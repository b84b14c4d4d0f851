"""Backpropagation maps from our own ReLU kernels: one forward, one backward each."""

from __future__ import annotations

import torch

from ..base import GradientRuleExplainer
from ..kernels.forward_record import ForwardRecord
from ..kernels.rules import BackwardRule
from ..registry import register


class _RuleGradient(GradientRuleExplainer):
    rule: BackwardRule

    def __init__(self, model):
        super().__init__(model)

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return record.input_gradient(targets, self.rule)


@register("saliency")
class Saliency(_RuleGradient):
    """Vanilla gradient (Simonyan et al. 2013), signed: ``1[f>0]·R`` at each ReLU."""

    rule = BackwardRule.GRADIENT


@register("guided_backprop")
class GuidedBackprop(_RuleGradient):
    """Guided Backpropagation (Springenberg et al. 2015): ``1[f>0]·1[R>0]·R`` at each ReLU.

    Largely class-insensitive (Nie et al. 2018) and fails the weight-randomisation check
    (Adebayo et al. 2018): it recovers the image more than it explains the decision.
    """

    rule = BackwardRule.GUIDED


@register("deconvnet")
class DeconvNet(_RuleGradient):
    """DeconvNet (Zeiler & Fergus 2014): ``1[R>0]·R`` at each ReLU, ignoring the forward mask."""

    rule = BackwardRule.DECONV


@register("input_x_gradient")
class InputXGradient(_RuleGradient):
    """Input × gradient, elementwise."""

    rule = BackwardRule.GRADIENT

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return record.inputs.detach() * record.input_gradient(targets, self.rule)
