"""One forward pass that serves a prediction and every gradient-rule explanation of it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..outputs import logits_of
from .capture import ALL_LAYERS, LayerCapture, capturing
from .layer_sites import LayerSiteState, SiteRule, recording_sites
from .rule_models import rule_model_for, uses_traced_rules
from .rules import BackwardRule, RuleSelector, selecting_rules


class ForwardRecord:
    """The graph of one forward through the model's rule model, kept for several backward passes.

    Each backward picks its activation rule when it runs (``retain_graph``), so guided backprop,
    DeconvNet and saliency of the same inputs share this one forward. Activations of the requested
    layers (any module by dotted name; ``ALL_LAYERS`` for every one) are captured in the same
    forward for CAM methods. With ``layer_sites`` the forward runs the rule model whose layers end in
    layer sites (``layer_sites.py``), for relevance methods; every other backward over it is the same.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, layers: Iterable[str] | None = (),
                 layer_sites: bool = False):
        self.inputs = inputs.detach().requires_grad_(True)
        self.model = model
        self._selector = RuleSelector()
        self.site_state: LayerSiteState | None = LayerSiteState() if layer_sites else None
        self._layer_gradients: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        rule_model = rule_model_for(model, inputs, layer_sites=layer_sites)
        names = ALL_LAYERS if layers is ALL_LAYERS else set(layers)
        if names:
            modules = dict(model.named_modules())
            missing = sorted(name for name in names if name not in modules or not name)
            if missing:
                raise InvalidOptionError(f"no layer named {missing} in the model")
        self._capture = LayerCapture(names) if names is ALL_LAYERS or names else None
        if self._capture is None:  # most requests: no CAM layer, nothing to capture
            with selecting_rules(self._selector), recording_sites(self.site_state):
                self.logits: torch.Tensor = logits_of(rule_model(self.inputs))
        else:
            # The fallback runs the model's own modules, whose forward hooks then feed the capture.
            hooked = None if uses_traced_rules(model) else model
            with capturing(self._capture, hooked), selecting_rules(self._selector), recording_sites(self.site_state):
                self.logits = logits_of(rule_model(self.inputs))
            if names is not ALL_LAYERS:
                not_reached = sorted(names - self._capture.activations.keys())
                if not_reached:
                    raise InvalidOptionError(f"layer(s) {not_reached} did not run in the forward pass")

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        return {} if self._capture is None else self._capture.activations

    @property
    def captured_calls(self) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """Every captured module call, ``(module names, output)``, in the order the calls ended."""
        return [] if self._capture is None else self._capture.calls

    @property
    def rule_sites(self) -> dict[str, int]:
        """Activation kind -> calls recorded in this forward: where a rule can apply."""
        return dict(self._selector.sites)

    def score(self, targets: torch.Tensor) -> torch.Tensor:
        # Rows are independent in eval mode, so the sum's gradient holds each row's own gradient.
        return self.logits.gather(1, targets.view(-1, 1)).sum()

    def input_gradient(self, targets: torch.Tensor, rule: BackwardRule) -> torch.Tensor:
        """d score / d input with ``rule`` at every recorded activation."""
        with self._selector.applying(rule):
            (gradient,) = torch.autograd.grad(self.score(targets), self.inputs, retain_graph=True)
        return gradient

    def site_backward(self, targets: torch.Tensor, rule: SiteRule) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(d score / d input, relevance returned directly)`` with ``rule`` at every layer site.

        Activations keep their plain gradient. Raises RuntimeError without layer sites.
        """
        if self.site_state is None:
            raise RuntimeError("this forward pass recorded no layer sites (ForwardRecord(layer_sites=True))")
        with self._selector.applying(BackwardRule.GRADIENT), self.site_state.applying(rule):
            (gradient,) = torch.autograd.grad(self.score(targets), self.inputs, retain_graph=True)
            direct = self.site_state.direct
        return gradient, direct

    def layer_gradient(self, targets: torch.Tensor, layer: str) -> torch.Tensor:
        """Plain d score / d activation of ``layer``: a backward that stops at the layer.

        Memoised per (layer, targets): every CAM method weighing the same layer for the same
        targets reads the one backward. Do not modify the returned tensor.

        Raises:
            InvalidOptionError: the layer does not feed the model's output.
        """
        return self.layer_gradients(targets, [layer])[0]

    def layer_gradients(self, targets: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        """:meth:`layer_gradient` of each of ``layers``; those not memoised yet from one backward.

        Raises:
            InvalidOptionError: a layer does not feed the model's output.
        """
        key = tuple(targets.tolist())
        missing = list(dict.fromkeys(layer for layer in layers if (layer, key) not in self._layer_gradients))
        if missing:
            with self._selector.applying(BackwardRule.GRADIENT):
                gradients = torch.autograd.grad(self.score(targets), [self.activations[layer] for layer in missing],
                                                retain_graph=True, allow_unused=True)
            for layer, gradient in zip(missing, gradients):
                if gradient is None:
                    raise InvalidOptionError(f"layer {layer!r} does not feed the model's output: nothing to weigh")
                self._layer_gradients[layer, key] = gradient
        return [self._layer_gradients[layer, key] for layer in layers]
