"""predict_and_explain: one forward pass for the prediction and every gradient-rule method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import Explainer, GradientRuleExplainer
from .errors import InvalidOptionError
from .explanation import Explanation
from .forward_record import ForwardRecord
from .hygiene import explanation_mode
from .registry import create
from .validation import TargetSpec, check_target_spec, resolve_targets, validate_inputs


def build_explainers(model: nn.Module, methods: Sequence[str | Explainer], options: Mapping) -> list[Explainer]:
    """Explainer instances for ``methods``, each with its own entry of ``options``.

    Raises:
        UnknownExplainerError: a name that is not registered.
        InvalidOptionError: a name twice, options for a method not requested, or a bad option.
    """
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence):
        raise InvalidOptionError(f"methods must be a list of explainer names, got {methods!r}")
    names = [method.name if isinstance(method, Explainer) else method for method in methods]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidOptionError(f"explainer(s) requested twice: {duplicates}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise InvalidOptionError(f"options given for explainer(s) not requested: {stray}")
    explainers = []
    for method in methods:
        if isinstance(method, Explainer):
            explainers.append(method)
            continue
        method_options = options.get(method, {})
        if not isinstance(method_options, Mapping):
            raise InvalidOptionError(f"options for {method} must be a mapping, got {method_options!r}")
        explainers.append(create(method, model, **method_options))
    return explainers


class ExplanationRun:
    """One forward pass of ``inputs`` shared by the prediction and every gradient-rule explainer.

    Use inside :func:`explanation_mode`. Gradient-rule explainers run backward passes over the
    recorded graph; the others run on their own afterwards. Each :meth:`explain` call may fail on
    its own without spoiling the others.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, explainers: Sequence[Explainer], target: TargetSpec):
        self.model = model
        self.inputs = validate_inputs(inputs, model)
        check_target_spec(target, self.inputs.shape[0])
        gradient_explainers = [e for e in explainers if isinstance(e, GradientRuleExplainer)]
        if gradient_explainers:
            layers = {layer for explainer in gradient_explainers for layer in explainer.layers()}
            self._record: ForwardRecord | None = ForwardRecord(model, self.inputs, layers)
            self.logits = self._record.logits
        else:
            self._record = None
            with torch.no_grad():
                self.logits = model(self.inputs)
        self.targets = resolve_targets(target, self.logits)

    def explain(self, explainer: Explainer, targets: torch.Tensor | None = None) -> Explanation:
        """``explainer``'s explanation for ``targets`` (default: the run's resolved targets)."""
        targets = self.targets if targets is None else targets
        if isinstance(explainer, GradientRuleExplainer):
            attributions = explainer.attribute_from_record(self._record, targets)
        else:
            attributions = explainer.attribute(self.inputs, targets)
        return Explanation(attributions.detach(), targets, explainer.name)


def predict_and_explain(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[str | Explainer] = (),
    target: TargetSpec = None,
    **options: Mapping,
) -> tuple[torch.Tensor, dict[str, Explanation]]:
    """Logits of ``inputs`` and an explanation per method, from one forward pass of the model.

    Gradient-rule methods (saliency, input_x_gradient, guided_backprop, deconvnet, grad_cam,
    guided_grad_cam) share that forward and each pay one backward; path and perturbation methods
    run after it, for the same targets.

    Args:
        model: an eager image classifier returning logits ``[B, classes]``.
        inputs: float tensor ``[B, C, H, W]``.
        methods: registry names (or explainer instances).
        target: None (each row's top-1), an int, a sequence of ints or a LongTensor ``[B]``.
        **options: per-method options, keyed by method name, e.g.
            ``integrated_gradients={"n_steps": 64}``.

    Raises:
        InvalidInputError, InvalidTargetError, UnknownExplainerError, InvalidOptionError.
    """
    explainers = build_explainers(model, methods, options)
    with explanation_mode(model):
        run = ExplanationRun(model, inputs, explainers, target)
        explanations = {explainer.name: run.explain(explainer) for explainer in explainers}
    return run.logits.detach(), explanations
