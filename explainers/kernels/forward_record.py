"""One forward pass that serves a prediction and every gradient-rule explanation of it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import InvalidOptionError
from .rule_models import rule_model_for
from .rules import BackwardRule, RuleSelector, active_selector, selecting_rules


class ForwardRecord:
    """The graph of one forward through the model's rule model, kept for several backward passes.

    Each backward picks its ReLU rule when it runs (``retain_graph``), so guided backprop, DeconvNet
    and saliency of the same inputs share this one forward. Activations of the requested layers are
    captured in the same forward for Grad-CAM.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, layers: Iterable[str] = ()):
        self.inputs = inputs.detach().requires_grad_(True)
        self._selector = RuleSelector()
        self.activations: dict[str, torch.Tensor] = {}
        rule_model = rule_model_for(model, inputs)
        with self._capturing(model, set(layers)), selecting_rules(self._selector):
            self.logits: torch.Tensor = rule_model(self.inputs)
        self._targets: torch.Tensor | None = None

    @contextlib.contextmanager
    def _capturing(self, model: nn.Module, layer_names: set[str]):
        if not layer_names:  # most requests: no Grad-CAM layer, no walk over the model's modules
            yield
            return
        modules = dict(model.named_modules())
        missing = sorted(name for name in layer_names if name not in modules)
        if missing:
            raise InvalidOptionError(f"no layer named {missing} in the model")
        selector = self._selector
        handles = []

        def capture(name: str):
            def hook(_module, _args, output):
                # Other threads may run this module meanwhile; only our own forward is recorded.
                if active_selector() is not selector:
                    return None
                self.activations[name] = output
                # The rest of the forward reads a copy, so an in-place op after the layer (the
                # model's own in-place ReLU on the fallback path, `out += identity`) cannot change
                # the activation Grad-CAM weighs; the gradient still flows to it through the copy.
                return output.clone() if isinstance(output, torch.Tensor) else None
            return hook

        try:
            for name in layer_names:
                handles.append(modules[name].register_forward_hook(capture(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()
        not_reached = sorted(layer_names - self.activations.keys())
        if not_reached:
            raise InvalidOptionError(f"layer(s) {not_reached} did not run in the forward pass")

    def score(self, targets: torch.Tensor) -> torch.Tensor:
        # Rows are independent in eval mode, so the sum's gradient holds each row's own gradient.
        return self.logits.gather(1, targets.view(-1, 1)).sum()

    def input_gradient(self, targets: torch.Tensor, rule: BackwardRule) -> torch.Tensor:
        """d score / d input with ``rule`` at every ReLU."""
        with self._selector.applying(rule):
            (gradient,) = torch.autograd.grad(self.score(targets), self.inputs, retain_graph=True)
        return gradient

    def layer_gradient(self, targets: torch.Tensor, layer: str) -> torch.Tensor:
        """Plain d score / d activation of ``layer``: a backward that stops at the layer."""
        with self._selector.applying(BackwardRule.GRADIENT):
            (gradient,) = torch.autograd.grad(self.score(targets), self.activations[layer], retain_graph=True)
        return gradient
