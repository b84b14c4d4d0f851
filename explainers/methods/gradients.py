"""Backpropagation maps from our own activation-rule kernels: one forward, one backward each."""

from __future__ import annotations

import torch

from ..base import GradientRuleExplainer
from ..errors import UnsupportedModelError
from ..kernels.activations import KINDS
from ..kernels.forward_record import ForwardRecord
from ..kernels.rules import BackwardRule
from ..registry import register


def require_rule_sites(record: ForwardRecord, method: str) -> None:
    """Refuses a rule method on a model where its rule has nowhere to apply: the result would be
    the plain gradient under the method's name.

    Raises:
        UnsupportedModelError: no activation call was recorded in the forward.
    """
    if not record.rule_sites:
        raise UnsupportedModelError(
            f"{method} applies its rule at activations ({', '.join(KINDS)}) and this model calls none "
            f"(custom autograd functions are not seen): its result would be the plain gradient; use saliency")


class _RuleGradient(GradientRuleExplainer):
    rule: BackwardRule

    def __init__(self, model):
        super().__init__(model)

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        if self.applies_rules:
            require_rule_sites(record, self.name)
        return record.input_gradient(targets, self.rule)


@register("saliency")
class Saliency(_RuleGradient):
    """Vanilla gradient (Simonyan et al. 2013), signed: ``phi'(f)·R`` at each activation."""

    rule = BackwardRule.GRADIENT


@register("guided_backprop")
class GuidedBackprop(_RuleGradient):
    """Guided Backpropagation (Springenberg et al. 2015): ``phi'(f)·max(R, 0)`` at each activation
    (``1[f>0]·1[R>0]·R`` at a ReLU).

    Largely class-insensitive (Nie et al. 2018) and fails the weight-randomisation check
    (Adebayo et al. 2018): it recovers the image more than it explains the decision.
    """

    rule = BackwardRule.GUIDED
    applies_rules = True


@register("deconvnet")
class DeconvNet(_RuleGradient):
    """DeconvNet (Zeiler & Fergus 2014): ``max(R, 0)`` at each activation, ignoring the forward pass."""

    rule = BackwardRule.DECONV
    applies_rules = True


@register("input_x_gradient")
class InputXGradient(_RuleGradient):
    """Input × gradient, elementwise."""

    rule = BackwardRule.GRADIENT

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return record.inputs.detach() * record.input_gradient(targets, self.rule)
