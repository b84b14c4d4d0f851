"""One forward pass shared by a prediction and every explainer that backpropagates over it.

Explainers are duck-typed here (``shares_forward``, ``applies_rules``, ``layers()``,
``explained_layer``, ``attribute_from_record``, ``attribute``; optionally ``needs_layer_sites`` and
``rule_sites_of(record)``): this module sits below ``base``, which builds ``Explainer.explain`` on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .explanation import Explanation
from .hygiene import explanation_mode
from .kernels.forward_record import ForwardRecord
from .outputs import logits_of
from .validation import TargetSpec, check_target_spec, resolve_targets, validate_inputs


class ExplanationRun:
    """One forward pass of ``inputs`` shared by the prediction and every gradient-rule explainer.

    Use inside :func:`explanation_mode`. Gradient-rule explainers run backward passes over the
    recorded graph; the others run on their own afterwards. Each :meth:`explain` call may fail on
    its own without spoiling the others.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, explainers: Sequence, target: TargetSpec):
        self.model = model
        self.inputs = validate_inputs(inputs, model)
        check_target_spec(target, self.inputs.shape[0])
        gradient_explainers = [e for e in explainers if e.shares_forward]
        if gradient_explainers:
            layers = {layer for explainer in gradient_explainers for layer in explainer.layers(self.inputs)}
            sites = any(getattr(explainer, "needs_layer_sites", False) for explainer in gradient_explainers)
            self._record: ForwardRecord | None = ForwardRecord(model, self.inputs, layers, layer_sites=sites)
            self.logits = self._record.logits
        else:
            self._record = None
            with torch.no_grad():
                self.logits = logits_of(model(self.inputs))
        self.targets = resolve_targets(target, self.logits)

    def explain(self, explainer, targets: torch.Tensor | None = None) -> Explanation:
        """``explainer``'s explanation for ``targets`` (default: the run's resolved targets)."""
        targets = self.targets if targets is None else targets
        if explainer.shares_forward:
            attributions = explainer.attribute_from_record(self._record, targets)
        else:
            attributions = explainer.attribute(self.inputs, targets)
        sites = self._record.rule_sites if explainer.applies_rules and self._record is not None else {}
        if self._record is not None and hasattr(explainer, "rule_sites_of"):  # methods with rules of their own
            sites = explainer.rule_sites_of(self._record)
        return Explanation(attributions.detach(), targets, explainer.name, sites, explainer.explained_layer)

    @classmethod
    def explain_one(cls, model: nn.Module, inputs: torch.Tensor, explainer, target: TargetSpec) -> Explanation:
        """One explainer's explanation of ``inputs``, the model in eval mode throughout."""
        with explanation_mode(model):
            return cls(model, inputs, [explainer], target).explain(explainer)
